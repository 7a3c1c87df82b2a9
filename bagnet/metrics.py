"""Classification metrics: top-k correctness, per-class accuracy, error consistency."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by callers that pass tensors; analysis needs only numpy
    import torch


def topk_correct(logits: "torch.Tensor", labels: "torch.Tensor", ks: tuple[int, ...] = (1, 5)) -> "dict[int, torch.Tensor]":
    """Per-sample booleans: is the label among the top-k logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels.view(-1, 1)
    return {k: hits[:, : min(k, kmax)].any(dim=1) for k in ks}


def cohens_kappa(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Error consistency (Geirhos et al. 2020): Cohen's kappa of two models' trial-by-trial correctness.

    Observed agreement c_obs against the agreement c_exp = p_a p_b + (1-p_a)(1-p_b) expected from
    two independent observers with the same accuracies: kappa = (c_obs - c_exp) / (1 - c_exp).
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty correctness vectors of equal length, got {a.shape} and {b.shape}")
    p_a, p_b = a.mean(), b.mean()
    c_obs = (a == b).mean()
    c_exp = p_a * p_b + (1 - p_a) * (1 - p_b)
    if np.isclose(c_exp, 1.0):
        return float("nan")  # both always right (or always wrong): kappa is undefined
    return float((c_obs - c_exp) / (1 - c_exp))


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy per class (NaN for classes without samples)."""
    correct = np.asarray(correct, dtype=float)
    labels = np.asarray(labels, dtype=int)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def group_mean(values: list[float] | np.ndarray, groups: list[str]) -> dict[str, float]:
    """Mean of per-class ``values`` within each group name, in order of first appearance."""
    out: dict[str, list[float]] = {}
    for value, group in zip(values, groups):
        out.setdefault(group, []).append(float(value))
    return {g: float(np.mean(v)) for g, v in out.items()}
