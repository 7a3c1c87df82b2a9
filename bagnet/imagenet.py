"""ImageNet folder layout (local or ``s3://``), image decoding, transforms and normalisation.

Layout: ``root/<split>/<wnid>/*.JPEG``; the class index is the sorted list of class folders, as
torchvision's ``ImageFolder`` builds it. Transforms work on uint8 HxWx3 numpy arrays (or PIL
images) and return uint8 HxWx3 arrays; normalisation happens batched in :func:`to_model_input`.
torch is imported only by :func:`to_model_input`.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from store import storage

if TYPE_CHECKING:
    import torch

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")


class ImageFolderIndex:
    """Index of ``root/<split>/<class>/<image>`` with ``.classes`` (sorted folder names),
    ``.class_to_idx`` and ``.samples`` (list of ``(path, label)``; ``path`` keeps ``root``'s
    protocol, so ``store.storage.read_bytes`` opens it). Files whose extension is not .jpeg/.jpg/.png
    (any case) are ignored; files may sit in sub-folders of a class folder."""

    def __init__(self, root: str, split: str) -> None:
        self.root, self.split = root, split
        self.path = storage.join(root, split)
        if not storage.is_dir(self.path):
            what, missing = ("split folder", self.path) if storage.is_dir(root) else ("root", root)
            raise FileNotFoundError(f"ImageNet {what} not found: {missing}")
        self.classes: list[str] = [name for name, is_dir in storage.list_dir(self.path) if is_dir]
        if not self.classes:
            raise FileNotFoundError(f"no class folders in {self.path}")
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        split_dir = storage.resolve(self.path)
        counts = dict.fromkeys(self.classes, 0)
        self.samples: list[tuple[str, int]] = []
        for p in storage.walk_files(self.path):
            cls, sep, _ = p[len(split_dir):].lstrip("/").partition("/")
            if sep and cls in self.class_to_idx and p.lower().endswith(IMAGE_EXTENSIONS):
                self.samples.append((p, self.class_to_idx[cls]))
                counts[cls] += 1
        self.samples.sort(key=lambda s: (s[1], s[0]))  # by class, then path (as torchvision)
        if empty := [c for c, n in counts.items() if n == 0]:
            shown = ", ".join(f"{self.path}/{c}" for c in empty[:5])
            exts = "/".join(IMAGE_EXTENSIONS)
            raise FileNotFoundError(f"no images ({exts}) in {len(empty)} class folder(s): {shown}")
        self.targets: list[int] = [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> bytes:
        """Raw bytes of sample ``i``."""
        return storage.read_bytes(self.samples[i][0])

    def load(self, i: int) -> tuple[np.ndarray, int]:
        """Decoded RGB image and label of sample ``i`` (raises :class:`ImageDecodeError`)."""
        path, label = self.samples[i]
        return decode_rgb(self.read(i), path), label

    def __repr__(self) -> str:
        return (f"ImageFolderIndex({self.path!r}: {len(self.samples)} images, "
                f"{len(self.classes)} classes)")


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded; ``.path`` and ``.reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # args stay (path, reason): picklable across processes
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot decode image {self.path}: {self.reason}"


def decode_rgb(data: bytes, path: str) -> np.ndarray:
    """Decode image bytes to uint8 HxWx3 RGB (grayscale, CMYK, RGBA, palette, 16-bit converted).
    Raises :class:`ImageDecodeError` naming ``path`` when the bytes are not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. truncated EXIF, palette transparency notes
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                    arr = np.asarray(img).astype(np.int64)
                    bits = 16 if img.mode.startswith("I;16") else int(arr.max()).bit_length()
                    shift = max(bits - 8, 0)
                    gray = np.clip(arr >> shift, 0, 255).astype(np.uint8)
                    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                rgb = img.convert("RGB")
                return np.asarray(rgb, dtype=np.uint8).copy()
    except MemoryError:
        raise
    except Exception as err:  # PIL plugins raise many types on corrupt data
        raise ImageDecodeError(path, f"{type(err).__name__}: {err}") from err


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip (p=0.5), as torchvision samples
    them, bilinear (PIL, antialiased). Random draws come from ``rng`` (a numpy Generator) when
    given, else from the transform's own generator seeded with ``seed``."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int | None = None) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.rng = np.random.default_rng(seed)

    def crop_box(self, height: int, width: int,
                 rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop (torchvision's algorithm: 10 tries, then centre)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                return int(top), int(left), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray | Image.Image,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        rng = self.rng if rng is None else rng
        img = _to_pil(image)
        top, left, h, w = self.crop_box(img.height, img.width, rng)
        out = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        arr = np.asarray(out, dtype=np.uint8)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr)


class EvalTransform:
    """Resize the shorter side to ``resize`` (bilinear, antialiased), then centre-crop ``size``."""

    def __init__(self, size: int = 224, resize: int = 256) -> None:
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size})")
        self.size, self.resize = size, resize

    def __call__(self, image: np.ndarray | Image.Image) -> np.ndarray:
        img = _to_pil(image)
        w, h = img.size
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        box = (left, top, left + self.size, top + self.size)
        return np.asarray(img.crop(box), dtype=np.uint8).copy()


def train_transform(size: int = 224, seed: int | None = None, **kw: Any) -> TrainTransform:
    """RandomResizedCrop(size) + horizontal flip: ``t(image, rng=None) -> uint8 (size, size, 3)``.
    """
    return TrainTransform(size, seed=seed, **kw)


def eval_transform(size: int = 224, resize: int = 256) -> EvalTransform:
    """Resize(resize) + CenterCrop(size); ``t(image) -> uint8 size x size x 3``."""
    return EvalTransform(size, resize)


def to_model_input(images: np.ndarray | torch.Tensor,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> float32 NCHW normalised with ``MEAN``/``STD`` (0-1 scale).
    With ``device`` the uint8 batch is moved first (4x less traffic), then converted."""
    import torch  # only here: decoding and transforms run in CPU tasks that need no torch

    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 NxHxWx3, got {x.dtype} {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()
