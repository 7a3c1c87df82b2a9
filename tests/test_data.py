"""Tests for bagnet.imagenet and bagnet.synthetic: the synthetic world, the ImageNet folder index, decoding, transforms."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagnet.imagenet import (
    MEAN, STD, ImageDecodeError, ImageFolderIndex, decode_rgb, eval_transform, to_model_input, train_transform,
)
from bagnet.synthetic import LOCAL_SCALE, MOTIF_SIZE, MOTIFS, SyntheticWorld, main, materialize
from store import storage

M = MOTIF_SIZE


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0, image_size=64)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- synthetic world ----------------------------------------------------------------------------


def test_classes(world: SyntheticWorld) -> None:
    assert world.num_classes == 10 == len(world.class_names)
    kinds = [(c.kind, c.scale) for c in world.classes]
    assert kinds.count(("local", LOCAL_SCALE)) == 4
    for s in (17, 33, 48):
        assert kinds.count(("arrangement", s)) == 2
    assert world.class_names == sorted(world.class_names)  # ImageFolder order == label order
    pairs = [c for c in world.classes if c.kind == "arrangement"]
    for a, b in zip(pairs[::2], pairs[1::2]):
        assert a.motifs == b.motifs and a.offsets == b.offsets
        assert (a.orientation, b.orientation) == ("h", "v")
    used = [m for c in world.classes for m in c.motifs]
    assert len(set(used)) == 4 + 3 * 2  # every pair / local class has its own motifs
    assert len({MOTIFS[i].tobytes() for i in range(len(MOTIFS))}) == len(MOTIFS)


def test_offset_ranges_documented(world: SyntheticWorld) -> None:
    ranges = {c.scale: c.offsets for c in world.classes if c.kind == "arrangement"}
    assert ranges == {17: (11, 14), 33: (19, 30), 48: (35, 45)}
    big = SyntheticWorld(image_size=224)
    assert {c.scale: c.offsets for c in big.classes if c.offsets} == ranges
    with pytest.raises(ValueError, match="pair scale 48"):
        SyntheticWorld(image_size=48)


def test_determinism(world: SyntheticWorld) -> None:
    a = world.batch(range(30), "train")
    b = SyntheticWorld(seed=0).batch(range(30), "train")
    assert a["image"].tobytes() == b["image"].tobytes()
    assert np.array_equal(world.sample(7).image, a["image"][7])
    assert not np.array_equal(world.batch(range(30), "val")["image"], a["image"])
    assert not np.array_equal(SyntheticWorld(seed=1).batch(range(30))["image"], a["image"])
    assert a["image_id"][5] == "synthetic/train/000005"
    with pytest.raises(ValueError, match="split"):
        world.sample(0, "bogus")


@pytest.mark.parametrize("size", [64, 96, 224])
def test_batch_shapes(size: int) -> None:
    w = SyntheticWorld(image_size=size)
    b = w.batch(np.arange(20), "test")
    assert b["image"].shape == (20, size, size, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int64 and b["scale"].dtype == np.int64
    assert list(b["label"]) == [i % w.num_classes for i in range(20)]
    assert list(b["kind"][:5]) == ["local"] * 4 + ["arrangement"]
    assert b["scale"][4] == 17


def test_label_balance_and_every_class(world: SyntheticWorld) -> None:
    labels = world.batch(range(1000))["label"]
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10


def _touch(a: tuple[int, int], b: tuple[int, int], q: int) -> bool:
    """Whether some q x q window touches both m x m motifs with top-left corners a and b."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= q + M - 2


def test_metadata_consistent(world: SyntheticWorld) -> None:
    for i in range(200):
        s = world.sample(i, "val")
        spec = world.classes[s.label]
        assert (s.meta["kind"], s.meta["scale"]) == (spec.kind, spec.scale)
        assert s.meta["class_name"] == spec.name
        # Repaint the recorded motifs in order over the image: nothing may change.
        img = s.image.copy()
        for mid, y, x in s.meta["motifs"]:
            assert world.margin <= min(y, x) and max(y, x) + M <= world.image_size - world.margin
            img[y:y + M, x:x + M] = MOTIFS[mid]
        assert np.array_equal(img, s.image)
        last_mid, y, x = s.meta["motifs"][-1]
        assert np.array_equal(s.image[y:y + M, x:x + M], MOTIFS[last_mid])
        # Background: everything outside the motifs is noise in 96..159.
        mask = np.ones(s.image.shape[:2], bool)
        for _, y, x in s.meta["motifs"]:
            mask[y:y + M, x:x + M] = False
        assert s.image[mask].min() >= 96 and s.image[mask].max() <= 159
        ids = [m for m, _, _ in s.meta["motifs"]]
        if spec.kind == "local":
            assert spec.motifs[0] in ids and not set(ids) & {4, 5, 6, 7, 8, 9}
        else:
            assert ids[:2] == list(spec.motifs) and set(ids[2:]) <= {10, 11}


def test_pair_patch_invisibility(world: SyntheticWorld) -> None:
    """For every pair image: no q_low x q_low window touches both motifs (at any position), one
    q_high x q_high window holds both, and the offset is in the documented range."""
    lows = {17: 9, 33: 17, 48: 33}
    seen: dict[str, set[int]] = {}
    for split in ("train", "val"):
        for i in range(4, 3000, 10):  # labels 4..9 are the pairs
            for j in (i, i + 1, i + 2, i + 3, i + 4, i + 5):
                s = world.sample(j, split)
                spec = world.classes[s.label]
                (_, ay, ax), (_, by, bx) = s.meta["motifs"][:2]
                d = s.meta["offset"]
                assert spec.offsets[0] <= d <= spec.offsets[1]
                delta = (abs(ay - by), abs(ax - bx))
                assert delta == ((0, d) if spec.orientation == "h" else (d, 0))
                assert not _touch((ay, ax), (by, bx), lows[spec.scale])
                assert d + M <= spec.scale  # both fit in one scale x scale window
                if spec.scale == 17:
                    assert _touch((ay, ax), (by, bx), 17)
                seen.setdefault(spec.name, set()).add(d)
    for c in world.classes[4:]:
        assert seen[c.name] == set(range(c.offsets[0], c.offsets[1] + 1))


def test_pair_single_motif_positions_same_law(world: SyntheticWorld) -> None:
    """Each motif's absolute position has the same law in both classes of a pair (statistical
    check of the docs/synthetic.md construction: total variation of the 2-D histograms)."""
    n = 2500  # sampling noise: E[TV] ~ 0.045 for 16 bins; a left/right design would give ~0.5
    for h_label in (4, 6, 8):
        pts = {lab: np.array([[yx for _, *yx in world.sample(lab + 10 * i).meta["motifs"][:2]]
                              for i in range(n)]) for lab in (h_label, h_label + 1)}
        for motif in (0, 1):
            hist = [np.histogramdd(pts[lab][:, motif], bins=(4, 4), range=[(8, 54)] * 2)[0] / n
                    for lab in (h_label, h_label + 1)]
            tv = 0.5 * np.abs(hist[0] - hist[1]).sum()
            assert tv < 0.1, (h_label, motif, tv)


def test_materialize_and_folder_index(world: SyntheticWorld, tmp_path: Path) -> None:
    root = str(tmp_path / "synth")
    assert materialize(world, root, "val", 25) == f"{root}/val"
    (tmp_path / "synth/val/local0/notes.txt").write_text("ignored")
    idx = ImageFolderIndex(root, "val")
    assert idx.classes == world.class_names
    assert idx.class_to_idx == {c: i for i, c in enumerate(world.class_names)}
    assert len(idx) == 25
    for path, label in idx.samples:
        i = int(Path(path).stem)
        assert label == i % world.num_classes
        assert np.array_equal(decode_rgb(storage.read_bytes(path), path), world.sample(i, "val").image)
    img, label = idx.load(0)
    assert img.shape == (64, 64, 3) and label == idx.samples[0][1]


def test_folder_index_extensions_and_memory_fs(tmp_path: Path) -> None:
    data = _png(np.zeros((4, 4, 3), np.uint8))
    for rel in ["b/x.JPEG", "b/sub/y.jpg", "a/z.PnG", "a/readme.md"]:
        p = tmp_path / "train" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    idx = ImageFolderIndex(str(tmp_path), "train")
    assert idx.classes == ["a", "b"]
    names = [(Path(p).name, y) for p, y in idx.samples]
    assert names == [("z.PnG", 0), ("y.jpg", 1), ("x.JPEG", 1)]


def test_folder_index_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderIndex(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/val"):
        ImageFolderIndex(str(tmp_path), "val")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderIndex(str(tmp_path), "train")
    (tmp_path / "train/n01").mkdir()
    with pytest.raises(FileNotFoundError, match="train/n01"):
        ImageFolderIndex(str(tmp_path), "train")


# -- decoding -----------------------------------------------------------------------------------


def test_decode_conversions() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_rgb(_png(rgb), "a.png"), rgb)
    gray = decode_rgb(_png(rgb, "L"), "g.png")
    assert gray.shape == (5, 7, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 2])
    rgba = np.dstack([rgb, np.full((5, 7), 10, np.uint8)])
    assert np.array_equal(decode_rgb(_png(rgba), "a.png"), rgb)
    assert decode_rgb(_png(rgb, "P"), "p.png").shape == (5, 7, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    assert decode_rgb(buf.getvalue(), "c.jpg").shape == (5, 7, 3)
    buf = io.BytesIO()
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(buf, format="PNG")
    assert decode_rgb(buf.getvalue(), "16.png").max() == 255


def test_decode_corrupt() -> None:
    with pytest.raises(ImageDecodeError, match="broken/x.JPEG") as err:
        decode_rgb(b"not an image at all", "broken/x.JPEG")
    assert isinstance(err.value, ValueError) and err.value.path == "broken/x.JPEG"
    again = pickle.loads(pickle.dumps(err.value))  # crosses Ray process boundaries
    assert str(again) == str(err.value) and again.reason == err.value.reason
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="JPEG")
    with pytest.raises(ImageDecodeError, match="t.jpg"):
        decode_rgb(buf.getvalue()[:200], "t.jpg")


# -- transforms and normalisation ---------------------------------------------------------------


def test_transforms() -> None:
    img = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    t = train_transform(224, seed=0)
    out = t(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    a = train_transform(32)(img, rng=np.random.default_rng(5))
    b = train_transform(32)(Image.fromarray(img), rng=np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert train_transform(16)(img[:10, :90]).shape == (16, 16, 3)  # falls back to centre crop
    ev = eval_transform(224, 256)(img)
    assert ev.shape == (224, 224, 3) and ev.dtype == np.uint8
    from torchvision.transforms import CenterCrop, Compose, Resize

    ref = Compose([Resize(256), CenterCrop(224)])(Image.fromarray(img))
    assert np.array_equal(ev, np.asarray(ref))
    with pytest.raises(ValueError):
        eval_transform(224, 200)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(8, 8)(img.astype(np.float32))


def test_to_model_input() -> None:
    x = np.zeros((2, 5, 6, 3), np.uint8)
    x[..., 0] = 255
    y = to_model_input(x)
    assert y.shape == (2, 3, 5, 6) and y.dtype == torch.float32 and y.is_contiguous()
    assert torch.allclose(y[:, 0], torch.tensor((1 - MEAN[0]) / STD[0]))
    assert torch.allclose(y[:, 1], torch.tensor(-MEAN[1] / STD[1]))
    assert torch.equal(to_model_input(torch.from_numpy(x)), y)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(x.astype(np.float32))


def test_grid_cli(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    main(["--grid", str(out), "--per-class", "1"])
    assert Image.open(out).size[0] > 64 * 3
