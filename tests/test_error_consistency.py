"""Error consistency as model-vs-human defines it, against a hand computation, and its bootstrap
interval over the images."""

import numpy as np
import pandas as pd
import pytest

from bagnet.experiments import predictions


def table(correct: dict[str, list[int]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "image_id": f"i{i}", "label": i % 2, "correct_top1": bool(c)}
                         for m, cs in correct.items() for i, c in enumerate(cs)])


def test_kappa_matches_a_hand_computation():
    # a: right on 6 of 10, b: right on 5 of 10; both right on 4, both wrong on 3 -> c_obs = 0.7
    a = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    # c_exp = 0.6 * 0.5 + 0.4 * 0.5 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    row = predictions.error_consistency(table({"a": a, "b": b})).iloc[0]
    assert row["observed_agreement"] == pytest.approx(0.7)
    assert row["kappa"] == pytest.approx(0.4)
    assert predictions.kappa_of_rates(np.array(0.6), np.array(0.5), np.array(0.7)) == pytest.approx(0.4)
    assert np.isnan(predictions.kappa_of_rates(np.array(1.0), np.array(1.0), np.array(1.0)))


def test_bootstrap_interval_is_seeded_and_covers_the_estimate():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.7
    b = np.where(rng.random(400) < 0.6, a, rng.random(400) < 0.7)  # agrees with a more than chance
    df = table({"a": a.astype(int).tolist(), "b": b.astype(int).tolist()})
    row = predictions.error_consistency(df).iloc[0]
    assert row["kappa_low"] < row["kappa"] < row["kappa_high"]
    assert 0 < row["kappa_low"] and row["kappa_high"] - row["kappa_low"] < 0.3
    again = predictions.error_consistency(df).iloc[0]
    assert (again["kappa_low"], again["kappa_high"]) == (row["kappa_low"], row["kappa_high"])
    other = predictions.kappa_interval(a, b, seed=7)
    assert other != (row["kappa_low"], row["kappa_high"])
    # the interval of the bootstrap distribution computed resample by resample
    boot = np.random.default_rng(predictions.BOOTSTRAP_SEED)
    kappas = []
    for _ in range(predictions.BOOTSTRAP_RESAMPLES // 100):
        idx = boot.integers(0, 400, size=(100, 400))
        for i in idx:
            pa_, pb_ = a[i].mean(), b[i].mean()
            c_exp = pa_ * pb_ + (1 - pa_) * (1 - pb_)
            kappas.append(((a[i] == b[i]).mean() - c_exp) / (1 - c_exp))
    assert predictions.kappa_interval(a, b) == pytest.approx(tuple(np.quantile(kappas, [0.025, 0.975])))


def test_no_interval_where_kappa_is_undefined():
    row = predictions.error_consistency(table({"a": [1, 1, 1], "b": [1, 1, 1]})).iloc[0]
    assert np.isnan(row["kappa"]) and np.isnan(row["kappa_low"]) and np.isnan(row["kappa_high"])
