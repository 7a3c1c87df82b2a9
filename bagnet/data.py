"""Data: the synthetic world (:mod:`bagnet.synthetic`) and the ImageNet folder layout,
decoding, transforms and normalisation (:mod:`bagnet.imagenet`), re-exported here."""

from bagnet.imagenet import (
    IMAGE_EXTENSIONS,
    MEAN,
    STD,
    EvalTransform,
    ImageDecodeError,
    ImageFolderIndex,
    TrainTransform,
    decode_rgb,
    eval_transform,
    open_fs,
    read_bytes,
    to_model_input,
    train_transform,
)
from bagnet.synthetic import (
    MOTIF_SIZE,
    MOTIFS,
    SPLITS,
    ClassSpec,
    Sample,
    SyntheticWorld,
    materialize,
    save_grid,
)

__all__ = [
    "IMAGE_EXTENSIONS", "MEAN", "STD", "EvalTransform", "ImageDecodeError", "ImageFolderIndex",
    "TrainTransform", "decode_rgb", "eval_transform", "open_fs", "read_bytes", "to_model_input",
    "train_transform", "MOTIF_SIZE", "MOTIFS", "SPLITS", "ClassSpec", "Sample", "SyntheticWorld",
    "materialize", "save_grid",
]
