"""Smoke test of the throughput benchmark: one tiny model, in-process, CSV columns checked."""

from __future__ import annotations

import csv

from bench import throughput


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
