"""The synthetic world: procedurally generated images whose classes are local or arrangement-based.

Every image is i.i.d. background noise with a few small (3x3 px) high-contrast glyphs ("motifs")
painted on it. ``local`` classes are defined by which motif they contain (solvable from 9x9
patches); ``arrangement`` pairs contain the same two motifs A and B, side by side (``-h``) or one
above the other (``-v``), at an offset chosen so that no window of the next-smaller BagNet patch
size can touch both. Design, proof of patch-invisibility and generation rates: docs/synthetic.md.

Pure numpy (PIL only for :func:`materialize`, matplotlib only for :func:`save_grid`).

    python -m bagnet.synthetic --grid docs/img/synthetic-samples.png   # the docs figure
    python -m bagnet.synthetic --bench                                 # images/s at 64 and 224 px
    python -m bagnet.synthetic --materialize /tmp/synth --split val --n 1000
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from bagnet.metrics import group_mean
from store import storage

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
CUE_CONFLICT_STREAM = 1  # appended to an image's generator seed: cue-conflict images draw their own stream
MOTIF_SIZE = 3
LOCAL_SCALE = 9  # the patch size that solves a local class (smallest BagNet)
BACKGROUND = (96, 63)  # background pixels: low + (random byte & mask), i.e. uniform on 96..159

# Motif glyphs: 3x3 boolean shapes in which every row and every column holds both colours, so a
# window that sees any single row or column of a motif sees both of its colours.
_SHAPES = [np.array(s, dtype=bool) for s in (
    [[1, 0, 1], [0, 1, 0], [1, 0, 1]],  # X
    [[0, 1, 0], [1, 0, 1], [0, 1, 0]],  # diamond
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],  # diagonal
    [[0, 0, 1], [0, 1, 0], [1, 0, 0]],  # anti-diagonal
    [[0, 1, 0], [1, 0, 0], [0, 0, 1]],
    [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
    [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
)]
_COLOURS = {"K": (0, 0, 0), "W": (255, 255, 255), "R": (255, 0, 0), "G": (0, 255, 0),
            "B": (0, 0, 255), "C": (0, 255, 255), "M": (255, 0, 255), "Y": (255, 255, 0)}
# (foreground, background) colours; all 16 unordered colour pairs differ. Every channel of every
# motif colour is 0 or 255, values the background noise (96..159) never takes.
_PAIRS = ["RK", "GW", "BY", "CM", "YK", "MG", "WR", "BC",
          "KG", "RY", "WB", "CK", "MY", "GR", "BK", "CW"]


def _make_motifs() -> np.ndarray:
    out = np.empty((len(_PAIRS), MOTIF_SIZE, MOTIF_SIZE, 3), np.uint8)
    for i, (fg, bg) in enumerate(_PAIRS):
        out[i] = np.where(_SHAPES[i % len(_SHAPES)][..., None], _COLOURS[fg], _COLOURS[bg])
    return out


MOTIFS: np.ndarray = _make_motifs()  # (16, 3, 3, 3) uint8
MOTIFS.flags.writeable = False


@dataclass(frozen=True)
class ClassSpec:
    """One class. ``scale``: the smallest square window (px) that always solves the class:
    9 for local classes, the pair scale (17, 33, 48 by default) for arrangement classes."""

    name: str
    kind: str  # "local" | "arrangement"
    scale: int | None
    motifs: tuple[int, ...] = ()  # local: (m,); arrangement: (A, B)
    orientation: str | None = None  # arrangement: "h" (side by side) | "v" (one above the other)
    offsets: tuple[int, int] | None = None  # arrangement: inclusive range of the offset d (px)


Box = tuple[int, int, int, int]  # (top, left, bottom, right), exclusive ends (BagNet.patch_box's convention)


@dataclass
class Sample:
    image: np.ndarray  # uint8 HxWx3
    label: int
    meta: dict[str, Any]


@dataclass
class SyntheticWorld:
    """Deterministic synthetic dataset: image ``index`` of ``split`` depends only on
    ``(seed, split, index)`` and the constructor arguments. Labels are ``index % num_classes``.

    Args:
        seed: world seed.
        image_size: side of the square images (px); >= 64 for the default pair scales.
        n_local: number of local classes.
        pair_scales: one arrangement pair per scale, strictly increasing; the pair at scale ``s``
            is invisible to windows of the previous scale ``q_low`` (9 before the first).
        margin: motifs lie at least this far from the image border (never clipped).
        max_copies: local images hold 1..max_copies copies of their motif.
        max_distractors: every image holds 0..max_distractors distractor motifs (same law for
            all classes), painted last.
        n_distractor_motifs: number of distinct distractor glyphs.
    """

    seed: int = 0
    image_size: int = 64
    n_local: int = 4
    pair_scales: tuple[int, ...] = (17, 33, 48)
    margin: int = 8
    max_copies: int = 3
    max_distractors: int = 2
    n_distractor_motifs: int = 2
    classes: list[ClassSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.pair_scales = tuple(int(s) for s in self.pair_scales)
        m, n_pairs = MOTIF_SIZE, len(self.pair_scales)
        needed = self.n_local + 2 * n_pairs + self.n_distractor_motifs
        if needed > len(MOTIFS):
            raise ValueError(f"{needed} motifs needed, only {len(MOTIFS)} exist")
        if self.n_local < 0 or self.max_copies < 1 or self.max_distractors < 0:
            raise ValueError("n_local, max_distractors must be >= 0 and max_copies >= 1")
        if self.max_distractors and self.n_distractor_motifs < 1:
            raise ValueError("max_distractors > 0 needs n_distractor_motifs >= 1")
        self._lo, self._hi = self.margin, self.image_size - self.margin - m  # top-left range
        if self._hi < self._lo:
            raise ValueError(f"image_size={self.image_size} too small for margin={self.margin}")
        lows = (LOCAL_SCALE, *self.pair_scales[:-1])
        width = len(str(max(self.pair_scales, default=0)))
        lw = len(str(max(self.n_local - 1, 0)))
        classes = [ClassSpec(f"local{i:0{lw}d}", "local", LOCAL_SCALE, (i,))
                   for i in range(self.n_local)]
        for k, (s, q_low) in enumerate(zip(self.pair_scales, lows)):
            if s <= q_low:
                raise ValueError(f"pair_scales must be increasing and > {LOCAL_SCALE}: {s}")
            d_lo, d_hi = q_low + m - 1, min(s - m, self._hi - self._lo)
            if d_lo > d_hi:
                raise ValueError(
                    f"pair scale {s}: offsets {d_lo}..{s - m} do not fit a {self.image_size}px "
                    f"image with margin {self.margin}")
            ab = (self.n_local + 2 * k, self.n_local + 2 * k + 1)
            for o in "hv":
                classes.append(ClassSpec(f"pair{s:0{width}d}-{o}", "arrangement", s, ab, o,
                                         (d_lo, d_hi)))
        self.classes = classes
        self._distractors = np.arange(self.n_local + 2 * n_pairs, needed)
        self._n_uniform = max(1 + 2 * self.max_copies, 5) + 1 + 3 * self.max_distractors
        self._names = [c.name for c in classes]
        assert self._names == sorted(self._names), "class names must sort in label order"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    def class_kinds(self) -> list[str]:
        """The kind of each class, for accuracy by kind: ``local motifs`` or ``arrangement <s>px``
        (the smallest window that solves it)."""
        return ["local motifs" if c.kind == "local" else f"arrangement {c.scale}px" for c in self.classes]

    def kind_accuracy(self, per_class: Sequence[float]) -> dict[str, float]:
        """Mean of the per-class accuracies ``per_class`` by class kind (:meth:`class_kinds`)."""
        return group_mean(list(per_class), self.class_kinds())

    def image_id(self, index: int, split: str = "train") -> str:
        return f"synthetic/{split}/{index:06d}"

    def parse_image_id(self, image_id: str) -> tuple[str, int]:
        """``(split, index)`` of an id made by :meth:`image_id`; ValueError naming it otherwise."""
        parts = str(image_id).split("/")
        if len(parts) == 3 and parts[1] in SPLITS and parts[2].isdigit() and image_id == self.image_id(int(parts[2]), parts[1]):
            return parts[1], int(parts[2])
        raise ValueError(f"{image_id!r} is not a synthetic image id (synthetic/<split>/<index>)")

    def sample(self, index: int, split: str = "train") -> Sample:
        image = np.empty((self.image_size, self.image_size, 3), np.uint8)
        meta = self._render(int(index), split, image)
        return Sample(image, int(meta["label"]), meta)

    def batch(self, indices: Sequence[int] | np.ndarray,
              split: str = "train") -> dict[str, np.ndarray]:
        """Images ``indices`` of ``split`` as arrays: image (N,H,W,3) uint8, label int64,
        image_id / kind str, scale int64."""
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        images = np.empty((len(idx), self.image_size, self.image_size, 3), np.uint8)
        labels = np.empty(len(idx), np.int64)
        for j, i in enumerate(idx):
            labels[j] = self._render(i, split, images[j], want_meta=False)
        return {
            "image": images,
            "label": labels,
            "image_id": np.array([self.image_id(i, split) for i in idx], dtype=str),
            "kind": np.array([self.classes[y].kind for y in labels], dtype=str),
            "scale": np.array([self.classes[y].scale for y in labels], dtype=np.int64),
        }

    # -- ground truth and cue conflict ------------------------------------------------------

    def evidence_boxes(self, index: int, split: str = "train") -> list[Box]:
        """Pixel boxes of the class evidence of image ``index``: one ``MOTIF_SIZE`` box per class
        motif the generator painted (every copy of a local class's glyph; a pair's A and B), as
        ``(top, left, bottom, right)`` with exclusive ends. Distractors are not evidence (a
        distractor painted over part of a class motif leaves its box as drawn)."""
        meta = self.sample(index, split).meta
        own = self.classes[meta["label"]].motifs
        return [(y, x, y + MOTIF_SIZE, x + MOTIF_SIZE) for mid, y, x in meta["motifs"] if mid in own]

    def ground_truth(self, image_id: str) -> list[Box]:
        """:meth:`evidence_boxes` of the image ``image_id`` (``synthetic/<split>/<index>``)."""
        split, index = self.parse_image_id(image_id)
        return self.evidence_boxes(index, split)

    def cue_conflicts(self) -> list[tuple[int, int]]:
        """Every ``(motif class, arrangement class)`` a cue-conflict image can take: the glyph of
        each local class in the layout of each arrangement class. Only these are defined: a local
        class has no arrangement (its copies lie anywhere), and a pair's glyphs name the pair but
        not its orientation, so they cannot stand for one class."""
        local = [c for c, spec in enumerate(self.classes) if spec.kind == "local"]
        return [(a, b) for b, spec in enumerate(self.classes) if spec.kind == "arrangement" for a in local]

    def cue_conflict(self, index: int, split: str = "train") -> Sample:
        """Cue-conflict image ``index`` of ``split``: the layout of an arrangement class (its
        offset, orientation, positions and distractors, drawn as for that class) with both of the
        pair's glyphs replaced by the glyph of a local class. The combination is
        ``cue_conflicts()[index % len(cue_conflicts())]``; the draws come from their own stream
        (``CUE_CONFLICT_STREAM``), so the image is not a re-coloured regular image. ``label`` is the
        arrangement class; ``meta`` adds ``motif_class`` and ``arrangement_class``."""
        combos = self.cue_conflicts()
        if not combos:
            raise ValueError("cue conflicts need at least one local and one arrangement class")
        motif_class, arrangement_class = combos[int(index) % len(combos)]
        image = np.empty((self.image_size, self.image_size, 3), np.uint8)
        meta = self._render(int(index), split, image, label=arrangement_class,
                            glyph=self.classes[motif_class].motifs[0], stream=(CUE_CONFLICT_STREAM,))
        meta.update(motif_class=motif_class, arrangement_class=arrangement_class)
        return Sample(image, arrangement_class, meta)

    # -- rendering -------------------------------------------------------------------------

    def _render(self, index: int, split: str, out: np.ndarray, want_meta: bool = True, *,
                label: int | None = None, glyph: int | None = None, stream: tuple[int, ...] = ()) -> Any:
        """Paint image ``index`` into ``out`` (HxWx3 uint8); return its meta dict (or label).
        ``label`` (default ``index % num_classes``), ``glyph`` (paint a pair's A and B with this
        glyph) and ``stream`` (extra generator seed words) make cue-conflict images."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, SPLITS[split], index, *stream])
        label = index % len(self.classes) if label is None else label
        spec = self.classes[label]
        # Background: i.i.d. uniform on 96..159 per pixel and channel (little-endian raw bits).
        n = out.size
        raw = rng.bit_generator.random_raw((n + 7) // 8).astype("<u8", copy=False)
        np.bitwise_and(raw.view(np.uint8)[:n].reshape(out.shape), BACKGROUND[1], out=out)
        out += np.uint8(BACKGROUND[0])

        # All other draws: one vector of uniforms, mapped to integers by floor(lo + u * n).
        u = iter(rng.random(self._n_uniform).tolist())

        def draw(lo: int, hi: int) -> int:  # uniform integer in lo..hi
            return min(lo + int(next(u) * (hi - lo + 1)), hi)

        lo, hi = self._lo, self._hi
        placed: list[tuple[int, int, int]] = []
        offset = None
        if spec.kind == "local":
            for _ in range(draw(1, self.max_copies)):
                placed.append((spec.motifs[0], draw(lo, hi), draw(lo, hi)))
        else:
            d_lo, d_hi = spec.offsets  # type: ignore[misc]
            offset = draw(d_lo, d_hi)
            # Along the pair's axis: the two motifs at u and u + d, in random order. Across it:
            # a coordinate with the same law (u' + d * bit), so each motif's position is
            # pi_d x pi_d for both orientations (docs/synthetic.md).
            first, along = draw(0, 1), draw(lo, hi - offset)
            along_a, along_b = along + offset * first, along + offset * (1 - first)
            cross = draw(lo, hi - offset) + offset * draw(0, 1)
            a, b = spec.motifs if glyph is None else (glyph, glyph)
            if spec.orientation == "h":
                placed += [(a, cross, along_a), (b, cross, along_b)]
            else:
                placed += [(a, along_a, cross), (b, along_b, cross)]
        if self.max_distractors:
            for _ in range(draw(0, self.max_distractors)):
                mid = int(self._distractors[draw(0, len(self._distractors) - 1)])
                placed.append((mid, draw(lo, hi), draw(lo, hi)))
        m = MOTIF_SIZE
        for mid, y, x in placed:
            out[y:y + m, x:x + m] = MOTIFS[mid]
        if not want_meta:
            return label
        return {"label": label, "class_name": spec.name, "kind": spec.kind, "scale": spec.scale,
                "motifs": placed, "offset": offset, "orientation": spec.orientation,
                "image_id": self.image_id(index, split), "split": split, "index": index}


# -- materialisation, figures, benchmark ---------------------------------------------------------


def materialize(world: SyntheticWorld, root: str, split: str = "train", n: int = 1000,
                start: int = 0, ext: str = "png", batch_size: int = 256) -> str:
    """Write images ``start .. start+n-1`` of ``split`` as
    ``root/<split>/<class_name>/<index>.<ext>`` (ImageNet folder layout; ``root`` local or
    ``s3://``). PNG is lossless; JPEG is not.
    Returns the split folder."""
    split_dir = storage.join(root, split)
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}[ext.lower()]
    for s in range(start, start + n, batch_size):
        idx = range(s, min(s + batch_size, start + n))
        b = world.batch(idx, split)
        for i, img, y in zip(idx, b["image"], b["label"]):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt)
            storage.write_bytes_atomic(f"{split_dir}/{world.class_names[y]}/{i:06d}.{ext}", buf.getvalue())
    return f"{root.rstrip('/')}/{split}"


def save_grid(world: SyntheticWorld, path: str, per_class: int = 6, split: str = "val",
              upscale: int = 3) -> None:
    """PNG grid of samples: one row per class, ``per_class`` columns, each image pixel drawn as
    ``upscale`` x ``upscale`` screen pixels (nearest neighbour, no resampling)."""
    import matplotlib  # optional picture dependency, loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    k, cell, gap, left, top = world.num_classes, world.image_size * upscale, 6, 170, 36
    mosaic = np.full((k * (cell + gap), per_class * (cell + gap), 3), 255, np.uint8)
    fig = plt.figure(figsize=((left + mosaic.shape[1]) / 100, (top + mosaic.shape[0]) / 100),
                     dpi=100)
    height = top + mosaic.shape[0]
    for c, spec in enumerate(world.classes):
        y0 = c * (cell + gap)
        for j in range(per_class):
            smp = world.sample(c + j * k, split)
            x0 = j * (cell + gap)
            big = smp.image.repeat(upscale, axis=0).repeat(upscale, axis=1)
            mosaic[y0:y0 + cell, x0:x0 + cell] = big
            if smp.meta["offset"] is not None:
                fig.text((left + x0 + 2) / fig.bbox.width, 1 - (top + y0 + 2) / height,
                         f"d={smp.meta['offset']}", fontsize=7, va="top", color="white",
                         bbox={"facecolor": "black", "pad": 1, "linewidth": 0})
        label = f"{spec.name}\n{spec.kind}, scale {spec.scale}"
        if spec.offsets:
            label += f"\nd = {spec.offsets[0]}..{spec.offsets[1]}"
        fig.text(6 / fig.bbox.width, 1 - (top + y0 + cell / 2) / height, label, fontsize=9,
                 va="center")
    fig.figimage(mosaic, xo=left, yo=0)
    fig.text(6 / fig.bbox.width, 1 - 8 / height,
             f"SyntheticWorld(seed={world.seed}, image_size={world.image_size}), split={split!r}, "
             f"{upscale}x nearest neighbour; d = offset between the pair's motifs (px)",
             fontsize=9, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    # a 128-colour palette keeps the noise backgrounds faithful at a third of the file size
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def bench(sizes: Sequence[int] = (64, 224), seconds: float = 2.0,
          batch_size: int = 256) -> dict[int, tuple[float, float]]:
    """``{size: (images per wall second, images per CPU second)}`` of ``SyntheticWorld.batch``
    in this process (one core). The CPU-time rate is robust to other load on the machine."""
    rates = {}
    for size in sizes:
        world = SyntheticWorld(image_size=size)
        world.batch(range(batch_size))  # warm-up
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - t0) < seconds:
            world.batch(range(done, done + batch_size))
            done += batch_size
        rates[size] = (done / elapsed, done / (time.process_time() - c0))
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bagnet.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", metavar="PNG", help="write a per-class sample grid")
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--bench", action="store_true", help="measure images/s at 64 and 224 px")
    p.add_argument("--materialize", metavar="ROOT", help="write an ImageNet-style folder")
    p.add_argument("--split", default="train", choices=sorted(SPLITS))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args(argv)
    world = SyntheticWorld(seed=a.seed, image_size=a.image_size)
    if not (a.grid or a.bench or a.materialize):
        p.error("nothing to do: give --grid, --bench or --materialize")
    if a.grid:
        save_grid(world, a.grid, a.per_class)
        print(f"wrote {a.grid}")
    if a.materialize:
        print(f"wrote {materialize(world, a.materialize, a.split, a.n)}")
    if a.bench:
        for size, (wall, cpu) in bench().items():
            print(f"{size:4d} px: {wall:7.0f} images/s wall, {cpu:7.0f} images per CPU-second "
                  "(one process)")


if __name__ == "__main__":
    main()
