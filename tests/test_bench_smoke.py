"""Smoke tests of the benchmarks: tiny models, in-process, CSV columns checked."""

from __future__ import annotations

import csv
import resource
import subprocess
import sys

import numpy as np
import pytest

from bench import experiment_stage, throughput
from store import results


def test_throughput_quick_writes_csv(tmp_path):
    out = tmp_path / "throughput.csv"
    table = throughput.main(["--quick", "--models", "bagnet9_small", "--size", "32", "--out", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = set(throughput.COLUMNS) | {"device", "torch", "torchvision", "ray", "precision", "batch_size",
                                          "cpu", "cores", "load_avg_1m", "date"}
    assert expected <= set(rows[0])
    assert [(r["mode"], r["path"]) for r in rows] == [
        ("infer", "eager"), ("infer", "fast"), ("train", "eager"), ("train", "fast")]
    assert all(r["model"] == "bagnet9_small" and r["size"] == "32" and r["precision"] == "fp32"
               and r["batch_size"] == "2" and float(r["images_per_s"]) > 0 for r in rows)
    fast = next(r for r in rows if r["mode"] == "infer" and r["path"] == "fast")
    assert float(fast["max_rel_diff"]) < 1e-4 and float(fast["top1_agreement"]) == 1.0
    assert len(table.rows) == 4


TINY_STAGE = ["--quick", "--test-size", "6", "--experiments", "predictions,shuffle"]  # untrained bagnet9_small


def test_experiment_stage_config_is_the_reproduce_stage_with_the_selections():
    cfg, names, _ = experiment_stage.stage_config(experiment_stage.parse_args(
        ["--untrained", "--models", "bagnet9_small", "resnet_small", "--train-dir", "elsewhere/train"]))
    assert names == "all" and [(m.name, m.weights) for m in cfg.models] == [("bagnet9_small", None),
                                                                             ("resnet_small", None)]
    # the reproduce stage's overrides, not the experiment config's own defaults
    assert cfg.data.test_size == 256 and cfg.experiments["interaction"]["pairs_per_distance"] == 2
    assert cfg.experiments["masking"]["ks"] == [0, 1, 2, 4, 8] and cfg.run_id == "experiments-synthetic-seed0"
    cfg, _, _ = experiment_stage.stage_config(experiment_stage.parse_args(
        ["--seed", "2", "--train-dir", "elsewhere/train", "--test-size", "16", "experiments.masking.ig_steps=4"]))
    assert cfg.models[0].weights.endswith("elsewhere/train/bagnet9_small-seed2/model.pt")
    assert cfg.data.test_size == 16 and cfg.experiments["masking"]["ig_steps"] == 4
    with pytest.raises(SystemExit, match="--models.*'nope'"):
        experiment_stage.stage_config(experiment_stage.parse_args(["--models", "nope"]))
    with pytest.raises(SystemExit, match="train.seeds.*no seed 9"):
        experiment_stage.stage_config(experiment_stage.parse_args(["--seed", "9"]))


def test_experiment_stage_plain_loop_writes_every_part_and_refuses_unequal_work(tmp_path):
    cfg, names, config_file = experiment_stage.stage_config(experiment_stage.parse_args(TINY_STAGE))
    run_dir = experiment_stage.run_plain(cfg, names, config_file, str(tmp_path))
    parts = results.completed_parts(run_dir)
    assert {rel: m["rows"] for rel, m in parts.items()} == {
        "predictions/experiment=predictions/model=bagnet9_small": 6,
        "shuffle/experiment=shuffle/model=bagnet9_small": 6 * 15}
    assert all(m["images"] == 6 and m["group_seconds"] > 0 for m in parts.values())
    experiment_stage.check_equal_rows(parts, parts)
    fewer = {rel: {**m, "rows": m["rows"] - 1} for rel, m in parts.items()}
    with pytest.raises(AssertionError, match="not the same work"):
        experiment_stage.check_equal_rows(parts, fewer)


@pytest.mark.slow  # a Ray Data pipeline and a model actor
def test_experiment_stage_tiny_writes_csv(ray_session, tmp_path):
    out = tmp_path / "experiment_stage.csv"
    table = experiment_stage.main([*TINY_STAGE, "--out", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(experiment_stage.COLUMNS) | {"cpu", "cores", "load_avg_1m", "date"} <= set(rows[0])
    assert [r["model"] for r in rows] == ["bagnet9_small", "start-up + images", "total"]
    total = rows[-1]
    assert total["parts"] == "2" and total["rows"] == str(6 + 6 * 15) and total["weights"] == "random"
    assert float(total["speed"]) == pytest.approx(float(total["plain_s"]) / float(total["ray_s"]), rel=1e-3)
    assert len(table.rows) == 3


def test_a_subprocess_peak_rss_is_its_own_not_its_parents():
    """``ru_maxrss`` survives ``exec``: a subprocess would report its parent's peak. bench.scale's
    per-measurement subprocesses read ``VmHWM`` (``bench.harness.peak_rss_mb``) instead."""
    big = np.ones(2**28, dtype=np.uint8)  # 256 MiB touched: this process's peak is at least that above the child's
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del big
    code = ("import resource; from bench.harness import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited >= parent_peak  # what getrusage says in the child
    assert own < parent_peak - 128  # what the child itself used
