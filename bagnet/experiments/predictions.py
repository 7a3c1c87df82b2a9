"""Plain predictions: top-5 classes, label logit and max logit of every image.

Table-level analysis of the ``predictions`` table lives here too: error consistency (Cohen's
kappa of two models' trial-by-trial correctness, Geirhos et al. 2020) with a bootstrap 95 %
interval over the images, and the correlation of per-class accuracies between models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations, combinations_with_replacement

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from bagnet.experiments.base import CustomSection, ExperimentContext, forward_in_chunks
from bagnet.metrics import cohens_kappa, per_class_accuracy, topk_correct

TABLE = "predictions"
TOPK = 5
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
SCHEMA = pa.schema([
    ("pred_top5", pa.list_(pa.int64())),
    ("correct_top1", pa.bool_()),
    ("correct_top5", pa.bool_()),
    ("label_logit", pa.float64()),
    ("max_logit", pa.float64()),
])
REPORT = CustomSection("accuracy")  # accuracy and error consistency, beside the training runs


@dataclass
class Params:
    """No parameters: the image logits are all this experiment needs."""


def run(model: nn.Module, images: Tensor, labels: Tensor, params: Params, *,
        ctx: ExperimentContext) -> list[dict]:
    """One row per image: ``pred_top5`` (best first; fewer with < 5 classes), ``correct_top1``,
    ``correct_top5``, ``label_logit``, ``max_logit``, plus ``image_id`` and ``label``."""
    with torch.inference_mode():
        logits = forward_in_chunks(model, images, ctx.batch_size).float()
    labels = labels.to(logits.device)
    top = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices.cpu().tolist()
    hits = topk_correct(logits, labels, (1, TOPK))
    label_logit = logits.gather(1, labels.view(-1, 1)).squeeze(1).cpu().tolist()
    max_logit = logits.max(dim=1).values.cpu().tolist()
    top1, top5 = hits[1].cpu().tolist(), hits[TOPK].cpu().tolist()
    return [
        {"image_id": ctx.image_ids[i], "label": int(y), "pred_top5": top[i],
         "correct_top1": bool(top1[i]), "correct_top5": bool(top5[i]),
         "label_logit": label_logit[i], "max_logit": max_logit[i]}
        for i, y in enumerate(labels.cpu().tolist())
    ]


def _models(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["model"].astype(str)))


def correctness_matrix(df: pd.DataFrame, column: str = "correct_top1") -> pd.DataFrame:
    """``image_id x model`` table of ``column`` (NaN where a model lacks an image). Raises
    ``ValueError`` when an (image, model) pair occurs twice, e.g. two runs mixed."""
    data = df.assign(model=df["model"].astype(str))
    dup = data.duplicated(["image_id", "model"])
    if dup.any():
        first = data.loc[dup, ["image_id", "model"]].iloc[0]
        raise ValueError(f"{int(dup.sum())} duplicate (image_id, model) rows, e.g. "
                         f"{first['image_id']!r} of {first['model']!r}; select one run first")
    wide = data.pivot(index="image_id", columns="model", values=column)
    return wide[_models(df)]


def _pairs(models: Iterable[str], self_pairs: bool) -> Iterator[tuple[str, str]]:
    """Every pair of ``models`` (each with itself too when ``self_pairs``)."""
    return combinations_with_replacement(models, 2) if self_pairs else combinations(models, 2)


def kappa_of_rates(p_a: np.ndarray, p_b: np.ndarray, c_obs: np.ndarray) -> np.ndarray:
    """kappa = (c_obs - c_exp) / (1 - c_exp), c_exp = p_a p_b + (1 - p_a)(1 - p_b), elementwise (NaN
    where c_exp is 1: both models always right, or always wrong)."""
    c_exp = p_a * p_b + (1 - p_a) * (1 - p_b)
    undefined = np.isclose(c_exp, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(undefined, np.nan, (c_obs - c_exp) / np.where(undefined, 1.0, 1 - c_exp))


def kappa_interval(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED, level: float = BOOTSTRAP_LEVEL,
                   chunk: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of the kappa of two paired correctness vectors: the images
    are resampled with replacement (the same images for both models), ``resamples`` times with a
    generator seeded by ``seed``; resamples where kappa is undefined are left out. NaN when none
    is defined."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    rng = np.random.default_rng(seed)
    kappas = []
    for start in range(0, resamples, chunk):  # bounded memory: chunk x n indices at a time
        idx = rng.integers(0, len(a), size=(min(chunk, resamples - start), len(a)))
        ra, rb = a[idx], b[idx]
        kappas.append(kappa_of_rates(ra.mean(1), rb.mean(1), (ra == rb).mean(1)))
    values = np.concatenate(kappas)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def error_consistency(df: pd.DataFrame, column: str = "correct_top1", *, self_pairs: bool = False,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Cohen's kappa between every pair of models, on the images both classified, with its
    bootstrap 95 % interval (:func:`kappa_interval`; none with ``resamples=0``).

    ``df``: the predictions table (``model``, ``image_id``, ``column``). Returns one row per
    pair (with ``self_pairs``, each model with itself too, for a full matrix): ``model_a, model_b,
    n_images, accuracy_a, accuracy_b, observed_agreement, kappa, kappa_low, kappa_high`` (kappa
    NaN when both models are always right or always wrong on those images)."""
    wide = correctness_matrix(df, column)
    out = []
    for a, b in _pairs(wide.columns, self_pairs):
        both = wide[list(dict.fromkeys((a, b)))].dropna()  # one column when a is b
        ca, cb = both[a].astype(bool).to_numpy(), both[b].astype(bool).to_numpy()
        low, high = kappa_interval(ca, cb, resamples=resamples, seed=seed) if len(both) and resamples else (np.nan,) * 2
        out.append({
            "model_a": a, "model_b": b, "n_images": len(both),
            "accuracy_a": float(ca.mean()) if len(both) else np.nan,
            "accuracy_b": float(cb.mean()) if len(both) else np.nan,
            "observed_agreement": float((ca == cb).mean()) if len(both) else np.nan,
            "kappa": cohens_kappa(ca, cb) if len(both) else np.nan,
            "kappa_low": low, "kappa_high": high,
        })
    return pd.DataFrame(out, columns=["model_a", "model_b", "n_images", "accuracy_a", "accuracy_b",
                                      "observed_agreement", "kappa", "kappa_low", "kappa_high"])


def class_accuracy(df: pd.DataFrame, column: str = "correct_top1",
                   num_classes: int | None = None) -> pd.DataFrame:
    """``label x model`` accuracy (NaN for classes without images)."""
    num_classes = num_classes or int(df["label"].max()) + 1
    data = df.assign(model=df["model"].astype(str))
    acc = {m: per_class_accuracy(g[column].to_numpy(bool), g["label"].to_numpy(int), num_classes)
           for m, g in data.groupby("model", sort=False)}
    out = pd.DataFrame({m: acc[m] for m in _models(df)})
    out.index.name = "label"
    return out


def class_accuracy_correlation(df: pd.DataFrame, column: str = "correct_top1",
                               method: str = "pearson", *, self_pairs: bool = False) -> pd.DataFrame:
    """Correlation of per-class accuracies between every pair of models (classes both have
    images of; with ``self_pairs``, each model with itself too). Returns ``model_a, model_b,
    n_classes, correlation`` (``method``: pearson, spearman or kendall; NaN when a model's
    accuracy is constant over those classes)."""
    acc = class_accuracy(df, column)
    out = []
    for a, b in _pairs(acc.columns, self_pairs):
        both = acc[list(dict.fromkeys((a, b)))].dropna()
        corr = both[a].corr(both[b], method=method) if len(both) > 1 else np.nan
        out.append({"model_a": a, "model_b": b, "n_classes": len(both), "correlation": float(corr)})
    return pd.DataFrame(out, columns=["model_a", "model_b", "n_classes", "correlation"])


__all__ = [
    "TABLE", "Params", "run", "correctness_matrix", "kappa_of_rates", "kappa_interval", "error_consistency", "class_accuracy",
    "class_accuracy_correlation",
]
