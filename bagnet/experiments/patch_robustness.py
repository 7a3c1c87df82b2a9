"""Certified and empirical robustness of a BagNet to adversarial patches.

For every patch size ``p`` (px) in ``patch_sizes`` and every defense of
:mod:`bagnet.patch_defense` (``undefended``, ``clipped``, ``masking``, ``vote``), per image:
the defended prediction of the clean image and its margin, whether it is certified (the same
prediction for every content and location of a ``p x p`` patch) with the certificate's worst-case
margin, and the prediction under the adaptive patch attack of :mod:`bagnet.patch_attack`.
Everything is computed from one evaluation of the patch logits per image; the attack then
recomputes only the cells its patch touches.

The attack targets the defended clean prediction of images that are correctly classified or
certified (an image already wrong needs no attack). A certified image whose prediction the
attack changes raises :class:`~bagnet.patch_defense.CertificateViolation`: the certificate is
sound, so that is a bug. Attack locations: every ``location_step`` px (exhaustive at 1), or,
with ``max_locations``, that many distinct windows of touched cells, those holding the most
evidence for the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.config import require
from bagnet.experiments.base import ExperimentContext, Summary
from bagnet.experiments.perturb import derive_seed, prepare_run, require_values
from bagnet.models import model_q
from bagnet.patch_attack import AttackConfig, attack_patch, rank_locations
from bagnet.patch_defense import DEFENSES, CertificateViolation, Geometry, certify

TABLE = "patch_robustness"
SCHEMA = pa.schema([
    ("patch_px", pa.int64()),
    ("defense", pa.string()),
    ("window_cells", pa.int64()),
    ("prediction", pa.int64()),
    ("margin", pa.float64()),
    ("certified", pa.bool_()),
    ("certified_margin", pa.float64()),
    ("attacked_prediction", pa.int64()),
    ("clean_correct", pa.bool_()),
    ("certified_correct", pa.bool_()),
    ("attacked_correct", pa.bool_()),
])
REPORT = Summary(
    title="Certified robustness to adversarial patches", x="patch_px", x_label="patch side p (px)",
    values={"certified_correct": "certified accuracy", "attacked_correct": "accuracy under attack",
            "clean_correct": "clean accuracy"},
    style="defense",
    caption="Per BagNet (one line per q) and defense (line style): accuracy certified against any p x p patch, "
            "under the adaptive patch attack, and on clean images. Certified <= attacked <= clean.",
)


@dataclass
class Params:
    """Patch sizes and defenses; attack strength. Defaults suit 64 px synthetic images."""

    patch_sizes: list[int] = field(default_factory=lambda: [4, 8, 12, 16])
    defenses: list[str] = field(default_factory=lambda: list(DEFENSES))
    clip_min: float = 0.0  # clipped: patch logits clamped to [clip_min, clip_max]
    clip_max: float = 1.0
    attack_steps: int = 10
    step_fraction: float = 0.25  # PGD sign step, fraction of the pixel range
    vote_temperature: float = 1.0  # softmax temperature standing in for votes in the attack
    location_step: int = 1  # px between attacked locations (1 = every location)
    max_locations: int | None = 4  # None: every location; else this many windows of cells per image
    sample_every: int = 1  # evaluate ~1 image in sample_every (by image id hash)
    seed: int | None = None  # None: the run's seed (ctx.seed)

    def validate(self) -> None:
        require_values(self.patch_sizes, "patch_sizes", minimum=1)
        require_values(self.defenses, "defenses")
        bad = [d for d in self.defenses if d not in DEFENSES]
        require(not bad, "defenses", f"unknown defense(s) {bad}; known: {list(DEFENSES)}")
        require(self.clip_max > self.clip_min, "clip_max", f"must be > clip_min ({self.clip_min}), got {self.clip_max}")
        require(self.attack_steps >= 0, "attack_steps", f"must be >= 0, got {self.attack_steps}")
        require(self.step_fraction > 0, "step_fraction", f"must be > 0, got {self.step_fraction}")
        require(self.vote_temperature > 0, "vote_temperature", f"must be > 0, got {self.vote_temperature}")
        require(self.location_step >= 1, "location_step", f"must be >= 1, got {self.location_step}")
        require(self.max_locations is None or self.max_locations >= 1, "max_locations",
                f"must be >= 1 or null, got {self.max_locations}")
        require(self.sample_every >= 1, "sample_every", f"must be >= 1, got {self.sample_every}")


def applies_to(model_name: str) -> bool:
    """BagNets only: the certificates need patch logits."""
    return model_q(model_name) is not None


def geometry_of(model: nn.Module, height: int, width: int) -> Geometry:
    """The patch-cell geometry of a BagNet on ``height x width`` inputs."""
    if not hasattr(model, "patch_logits"):
        raise ValueError(f"patch_robustness needs a BagNet (patch_logits), got {type(model).__name__}")
    return Geometry(model.q, model.stride, model.offset, model.patch_grid(height, width))


def run(model: nn.Module, images: Tensor, labels: Tensor, params: Params, *, ctx: ExperimentContext) -> list[dict]:
    """Rows ``(image, p, defense)``: sampled images x patch_sizes x defenses."""
    if (seed := prepare_run(params, images, labels, ctx)) is None:
        return []
    keep = [n for n, i in enumerate(ctx.image_ids) if derive_seed(seed, i, "patch_robustness") % params.sample_every == 0]
    if not keep:
        return []
    size = tuple(images.shape[-2:])
    geometry = geometry_of(model, *size)
    config = AttackConfig(params.attack_steps, params.step_fraction, params.vote_temperature, ctx.batch_size)
    clip = (params.clip_min, params.clip_max)
    # the attack needs gradients: normal tensors even if the caller runs in inference mode
    with torch.inference_mode(False):
        x, y = images[keep].clone(), labels[keep].clone()
        with torch.no_grad():
            clean = torch.cat([model.patch_logits(chunk) for chunk in x.split(ctx.batch_size)])
        rows = []
        for p in params.patch_sizes:
            if p > min(size):
                raise ValueError(f"patch_robustness patch_sizes: p={p} exceeds the {size[0]}x{size[1]} image")
            for defense in params.defenses:
                rows += _rows(model, x, y, clean, p, defense, geometry, clip, params, config, seed,
                              [ctx.image_ids[n] for n in keep])
    return rows


def _rows(model, x, y, clean, p, defense, geometry, clip, params, config, seed, image_ids) -> list[dict]:
    window = geometry.window(p)
    cert = certify(clean, defense, window, clip=clip)
    attack = (cert.prediction == y) | cert.certified
    corners = [rank_locations(clean[n], int(cert.prediction[n]), geometry, p, tuple(x.shape[-2:]),
                              params.location_step, params.max_locations) if attack[n] else []
               for n in range(len(x))]
    generator = torch.Generator().manual_seed(derive_seed(seed, p, defense, *image_ids))
    attacked = attack_patch(model, x, clean, cert.prediction, corners, p, defense, geometry, clip, config, generator)
    broken = cert.certified & (attacked != cert.prediction)
    if bool(broken.any()):
        n = int(broken.nonzero()[0])
        raise CertificateViolation(
            f"patch_robustness: image {image_ids[n]!r} is certified for defense {defense!r} at p={p} "
            f"(certified margin {float(cert.certified_margin[n]):.4g}) but the attack changed its prediction "
            f"{int(cert.prediction[n])} -> {int(attacked[n])}: the certificate is wrong")
    return [
        {
            "image_id": str(image_ids[n]),
            "label": int(y[n]),
            "patch_px": p,
            "defense": defense,
            "window_cells": window[0] * window[1],
            "prediction": int(cert.prediction[n]),
            "margin": float(cert.margin[n]),
            "certified": bool(cert.certified[n]),
            "certified_margin": float(cert.certified_margin[n]),
            "attacked_prediction": int(attacked[n]),
            "clean_correct": bool(cert.prediction[n] == y[n]),
            "certified_correct": bool(cert.certified[n] and cert.prediction[n] == y[n]),
            "attacked_correct": bool(attacked[n] == y[n]),
        }
        for n in range(len(x))
    ]
