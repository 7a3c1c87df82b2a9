"""The experiment runner (cluster.evaluation, jobs/experiment.py): config checks, result tables,
resume, an experiment module added from outside the package; the registry and predictions."""

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from ray.exceptions import GetTimeoutError
from ray.util.state import list_actors
from torch import nn

from bagnet.config import from_dict, load_config
from bagnet.experiments import (
    EXPERIMENTS, CustomSection, ExperimentContext, ExperimentRegistry, ExperimentUnavailable, Summary, predictions,
)
from bagnet.experiments.base import REQUIRED_ATTRIBUTES
from bagnet.imagenet import to_model_input
from bagnet.models import create_model, model_bytes
from bagnet.synthetic import SyntheticWorld
from cluster import evaluation
from cluster.configs import ExperimentJobConfig, ModelConfig
from jobs import experiment as job
from store import results, storage
from tests.cluster_utils import second_driver_env
from tests.test_concurrency import Jobs
from tests.fixtures_s3 import storage_options

N_IMAGES = 32
ROOT = Path(__file__).resolve().parents[1]
# Small parameters for the experiments that have them (any other experiment runs with its defaults).
TINY_PARAMS = {
    "heatmaps": "{resolution: coarse}",
    "shuffle": "{tiles: [16], num_perms: 1}",
    "interaction": "{region_sizes: [8], distances: [0, 16], pairs_per_distance: 1}",
    "masking": "{rankings: [random, bagnet_heatmap], ks: [0, 2], heatmap_model: bagnet9_small}",
    "patch_robustness": "{patch_sizes: [8], attack_steps: 2, max_locations: 1, sample_every: 1}",
    "localization": "{images: 8, ig_steps: 2, occlusion_window: 16, occlusion_stride: 16}",
}


def columns(module: ModuleType) -> list[str]:
    """Every column of an experiment's table as read back: its stored schema plus the partition keys."""
    return [*results.table_schema(module.SCHEMA).names, *results.PARTITION_KEYS]


# --------------------------------------------------------------------------------------------
# An experiment module from outside the package, written by the test (the contract only)

DUMMY_NAME = "dummy_probe"
DUMMY_TITLE = "Dummy probe: label logit by image parity"
DUMMY_SOURCE = f'''
"""A test experiment outside the package: each image's label logit, bucketed by parity."""
from dataclasses import dataclass

import pyarrow as pa
import torch

from bagnet.experiments.base import Summary, forward_in_chunks

TABLE = "{DUMMY_NAME}"
SCHEMA = pa.schema([("bucket", pa.int64()), ("label_logit", pa.float64())])
REPORT = Summary(title="{DUMMY_TITLE}", x="bucket", x_label="image index mod buckets",
                 values={{"label_logit": "label logit"}})


@dataclass
class Params:
    buckets: int = 2
    broken: str = ""  # "extra": an undeclared column; "type": a wrongly typed one


def run(model, images, labels, params, *, ctx):
    with torch.inference_mode():
        logits = forward_in_chunks(model, images, ctx.batch_size).float()
    rows = [{{"image_id": image_id, "label": int(y), "bucket": n % params.buckets,
              "label_logit": float(logits[n, y])}}
            for n, (image_id, y) in enumerate(zip(ctx.image_ids, labels.tolist()))]
    for row in rows:
        if params.broken == "extra":
            row["note"] = "x"
        elif params.broken == "type":
            row["bucket"] = "odd"
    return rows
'''


@pytest.fixture
def dummy_module(tmp_path, monkeypatch) -> str:
    """``dummy_probe`` importable from a temporary folder; unregistered afterwards."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{DUMMY_NAME}.py").write_text(DUMMY_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    yield DUMMY_NAME
    EXPERIMENTS.unregister(DUMMY_NAME)
    sys.modules.pop(DUMMY_NAME, None)


# --------------------------------------------------------------------------------------------
# registry and the predictions experiment (no Ray)


def test_registry_discovers_the_package_and_checks_the_contract():
    names = list(EXPERIMENTS)
    assert names[0] == "predictions" and len(names) == len(set(names)) and "nope" not in EXPERIMENTS
    for name in names:
        module = EXPERIMENTS[name]
        assert all(hasattr(module, a) for a in REQUIRED_ATTRIBUTES), name
        assert isinstance(module.SCHEMA, pa.Schema) and isinstance(module.REPORT, (Summary, CustomSection)), name
        results.table_schema(module.SCHEMA)  # no clash with the common columns
    assert EXPERIMENTS.tables() == {n: EXPERIMENTS[n].TABLE for n in names}
    assert EXPERIMENTS["predictions"].run is predictions.run
    with pytest.raises(KeyError, match="unknown experiment 'nope'; known: predictions, "):
        EXPERIMENTS["nope"]
    registry = ExperimentRegistry()
    with pytest.raises(ExperimentUnavailable, match="bagnet.experiments.base lacks TABLE"):
        registry.register("bagnet.experiments.base")
    assert list(registry) == names  # a module that breaks the contract is not added


def test_an_outside_module_registered_by_the_config_joins_all(dummy_module, tmp_path):
    cfg = load_config(ExperimentJobConfig, job.DEFAULT_CONFIG, [
        f"output={tmp_path}", "models=[{name: bagnet9_small}]", f"modules=[{dummy_module}]"])
    assert evaluation.parse_experiments("all")[-1] == dummy_module and dummy_module in EXPERIMENTS
    plan = evaluation.make_plan(cfg, [dummy_module], None)
    assert [p.key for p in plan.parts] == [f"{dummy_module}/bagnet9_small"] and plan.parts[0].params.buckets == 2
    assert plan.parts[0].path.endswith(f"{dummy_module}/experiment={dummy_module}/model=bagnet9_small")
    env = evaluation.runtime_env(cfg)  # the Ray workers find the module where the driver did
    assert env["env_vars"]["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "modules"), "${PYTHONPATH}"])


class FixedLogits(nn.Module):
    """Returns the given logits row by row, whatever the images; records the chunk sizes."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.calls: list[int] = []

    def forward(self, x):
        start = sum(self.calls)
        self.calls.append(len(x))
        return self.logits[start: start + len(x)]


def test_predictions_rows():
    logits = [[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [0, 1, 9, 2, 3, 0.5, 4]]
    model = FixedLogits(logits)
    ctx = ExperimentContext(image_ids=["a", "b", "c"], model_name="m", batch_size=2)
    rows = predictions.run(model, torch.zeros(3, 3, 8, 8), torch.tensor([6, 2, 5]), predictions.Params(), ctx=ctx)
    assert model.calls == [2, 1]  # forwarded in chunks of ctx.batch_size
    assert [r["image_id"] for r in rows] == ["a", "b", "c"] and [r["label"] for r in rows] == [6, 2, 5]
    assert [r["pred_top5"] for r in rows] == [[6, 5, 4, 3, 2], [0, 1, 2, 3, 4], [2, 6, 4, 3, 1]]
    assert [r["correct_top1"] for r in rows] == [True, False, False]
    assert [r["correct_top5"] for r in rows] == [True, True, False]
    assert [r["label_logit"] for r in rows] == [6.0, 4.0, 0.5]
    assert [r["max_logit"] for r in rows] == [6.0, 6.0, 9.0]
    table = results.rows_to_table(rows, _common(), predictions.SCHEMA, experiment="predictions")
    assert table.schema == results.table_schema(predictions.SCHEMA)
    few = predictions.run(FixedLogits([[1, 3, 2]]), torch.zeros(1, 3, 8, 8), torch.tensor([0]),
                          predictions.Params(), ctx=ExperimentContext(image_ids=["x"], model_name="m"))
    assert few[0]["pred_top5"] == [1, 2, 0] and few[0]["correct_top5"] and not few[0]["correct_top1"]


def _table(correct: dict[str, list[int]], labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "image_id": f"i{i}", "label": labels[i], "correct_top1": bool(c)}
                         for m, cs in correct.items() for i, c in enumerate(cs)])


def test_error_consistency_and_class_accuracy_correlation():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    a = [1, 1, 1, 0, 0, 0, 1, 1]
    df = _table({"a": a, "same": a, "flip": [1 - x for x in a], "b": [1, 0, 1, 1, 0, 1, 1, 0]}, labels)
    ec = predictions.error_consistency(df).set_index(["model_a", "model_b"])
    assert len(ec) == 6 and (ec["n_images"] == 8).all()
    assert ec.loc[("a", "same"), "kappa"] == pytest.approx(1.0)
    # never agree; p_a = 5/8, p_flip = 3/8 -> c_exp = 30/64, kappa = -30/34
    assert ec.loc[("a", "flip"), "kappa"] == pytest.approx(-15 / 17)
    # a vs b: agree on 4 of 8; p_a = p_b = 5/8 -> c_exp = 34/64, kappa = (32/64 - 34/64) / (30/64)
    assert ec.loc[("a", "b"), "observed_agreement"] == pytest.approx(0.5)
    assert ec.loc[("a", "b"), "kappa"] == pytest.approx(-1 / 15)
    acc = predictions.class_accuracy(df)
    assert acc["a"].tolist() == [1.0, 0.5, 0.0, 1.0] and acc["b"].tolist() == [0.5, 1.0, 0.5, 0.5]
    corr = predictions.class_accuracy_correlation(df).set_index(["model_a", "model_b"])
    assert corr.loc[("a", "same"), "correlation"] == pytest.approx(1.0)
    assert corr.loc[("a", "flip"), "correlation"] == pytest.approx(-1.0)
    assert corr.loc[("a", "b"), "correlation"] == pytest.approx(np.corrcoef(acc["a"], acc["b"])[0, 1])
    assert (corr["n_classes"] == 4).all()
    with pytest.raises(ValueError, match="duplicate"):
        predictions.error_consistency(pd.concat([df, df]))


# --------------------------------------------------------------------------------------------
# result tables (no Ray)


def _common(run_id="r", q=None):
    return {"run_id": run_id, "q": q, "weights": "random", "dataset": "synthetic", "split": "val", "seed": 0,
            "precision": "fp32", "created_at": results.utc_now(), "code_version": "v"}


def test_part_writer_layout_reads_back_with_pandas_and_pyarrow(tmp_path):
    own = pa.schema([("pred_top5", pa.list_(pa.int64())), ("correct_top1", pa.bool_())])
    run_dir = str(tmp_path / "run")
    for model, q in (("bagnet9_small", 9), ("resnet_small", None)):
        part = results.part_dir(run_dir, "predictions", {"experiment": "predictions", "model": model})
        writer = results.PartWriter(part, max_file_bytes=1)  # one file per write
        for start in (0, 2):
            rows = [{"image_id": f"i{i}", "label": i, "pred_top5": [i, 0], "correct_top1": True}
                    for i in range(start, start + 2)]
            writer.write(results.rows_to_table(rows, _common(q=q), own, experiment="predictions"))
        assert results.read_marker(part) is None
        marker = writer.commit({"fingerprint": {"x": 1}})
        assert marker["rows"] == 4 and marker["files"] == ["part-00000.parquet", "part-00001.parquet"]
    table_dir = tmp_path / "run" / "predictions"
    df = pd.read_parquet(table_dir)
    assert sorted(df.columns) == sorted([*results.COMMON_SCHEMA.names, *own.names])
    assert len(df) == 8 and set(df["model"].astype(str)) == {"bagnet9_small", "resnet_small"}
    assert df.groupby(df["model"].astype(str))["q"].first().isna().tolist() == [False, True]
    arrow = pads.dataset(table_dir, partitioning="hive").to_table()
    assert sorted(arrow.column_names) == sorted(df.columns) and arrow.num_rows == 8
    assert str(arrow.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    parts = results.completed_parts(run_dir)
    assert list(parts) == ["predictions/experiment=predictions/model=bagnet9_small",
                           "predictions/experiment=predictions/model=resnet_small"]
    assert results.rows_per_table(parts) == {"predictions": 8}
    with pytest.raises(ValueError, match="directory name"):
        results.part_dir(run_dir, "t", {"model": "a/b"})


def _batch(n: int = 6) -> dict[str, np.ndarray]:
    b = SyntheticWorld(seed=0, image_size=64).batch(range(n), split="test")
    return {"image": b["image"], "label": b["label"], "image_id": np.asarray(b["image_id"]),
            "path": np.full(n, ""), "error": np.full(n, ""), "reads": np.zeros(n, np.int64)}


def _actor(experiments: dict[str, dict], *, fast: bool = False, modules=(), out: Path | None = None) -> evaluation.ModelActor:
    model = ModelConfig(name="bagnet9_small")
    params = {name: from_dict(EXPERIMENTS[name].Params, raw) for name, raw in experiments.items()}
    out = out or Path(tempfile.mkdtemp())
    paths = {name: (str(out / name), str(out / f"{name}-failures")) for name in experiments}
    return evaluation.ModelActor(experiments=params, model=model, helpers={"bagnet": model}, modules=list(modules),
                                 num_classes=10, use_gpu=False, precision="fp32", seed=0, forward_batch_size=8,
                                 common=_common(q=9), paths=paths, fast=fast, torch_threads=1,
                                 world=SyntheticWorld(seed=0, image_size=64))


def _actor_rows(fast: bool, experiments: dict[str, dict], batch: dict) -> tuple[dict, dict[str, pd.DataFrame]]:
    actor = _actor(experiments, fast=fast)
    out = actor(batch)
    assert set(out) == set(evaluation.COLUMNS) and all(len(v) == len(experiments) for v in out.values())
    tables = {}
    for name, files in zip(out[evaluation.COL_EXPERIMENT], out[evaluation.COL_FILE]):
        (check,) = json.loads(files)
        tables[name] = pq.read_table(os.path.join(actor.paths[name][0], check["name"])).to_pandas()
        assert len(tables[name]) == check["rows"]
    return out, tables


def test_model_actor_runs_every_experiment_of_its_model_and_the_fast_path_agrees():
    """One actor call: a row per experiment (its Arrow rows, images, model evaluations, seconds),
    the same rows as each experiment run alone; compute.fast gives the same numbers."""
    batch = _batch()
    experiments = {name: {} for name in EXPERIMENTS}
    experiments.update(heatmaps={"resolution": "full"}, shuffle={"tiles": [16], "num_perms": 1},
                       interaction={"region_sizes": [8], "distances": [0, 16], "pairs_per_distance": 1},
                       masking={"rankings": ["random", "bagnet_heatmap"], "ks": [0, 2], "heatmap_model": "bagnet9_small"},
                       localization={"images": 2, "ig_steps": 2, "occlusion_window": 16, "occlusion_stride": 16})
    out, eager = _actor_rows(False, experiments, batch)
    assert list(out[evaluation.COL_EXPERIMENT]) == list(experiments) and (out[evaluation.COL_IMAGES] == 6).all()
    for name, df in eager.items():  # each table has exactly its declared columns
        assert list(df.columns) == results.table_schema(EXPERIMENTS[name].SCHEMA).names, name
    # evaluations counted per experiment: 1 per image; shuffle the original + 1 tiling; masking 2 rankings x 2 ks
    evals = dict(zip(out[evaluation.COL_EXPERIMENT], out[evaluation.COL_EVALS]))
    assert evals["predictions"] == 6 and evals["shuffle"] == 12 and evals["masking"] >= 4 * 6
    assert (out[evaluation.COL_SECONDS] > 0).all()
    _, alone = _actor_rows(False, {"shuffle": experiments["shuffle"]}, batch)
    pd.testing.assert_frame_equal(alone["shuffle"].drop(columns="created_at"),
                                  eager["shuffle"].drop(columns="created_at"))
    _, fast = _actor_rows(True, experiments, batch)
    for name, df in eager.items():
        assert list(fast[name].columns) == list(df.columns) and len(fast[name]) == len(df) > 0, name
        for col in df.columns:
            if col == "created_at":
                continue
            a, f = df[col].to_numpy(), fast[name][col].to_numpy()
            if df[col].dtype.kind == "f":
                np.testing.assert_allclose(f, a, rtol=1e-4, atol=1e-4, err_msg=f"{name}.{col}")
            elif df[col].dtype == object and isinstance(a[0], np.ndarray):  # heatmap values, top-5 lists
                for x, y in zip(a, f):
                    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4, err_msg=f"{name}.{col}")
            else:
                assert (a == f).all(), (name, col)


@pytest.mark.parametrize("broken, message", [
    ("extra", "experiment 'dummy_probe': column 'note' is not in its SCHEMA"),
    ("type", "experiment 'dummy_probe': column 'bucket' must be int64"),
])
def test_rows_that_break_the_schema_fail_naming_column_and_experiment(dummy_module, broken, message):
    EXPERIMENTS.register(dummy_module)
    actor = _actor({dummy_module: {"broken": broken}}, modules=[dummy_module])
    with pytest.raises(results.SchemaError, match=message):
        actor(_batch(2))


# --------------------------------------------------------------------------------------------
# config errors: all raised before any Ray work


@pytest.fixture
def no_ray(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(evaluation, "init_ray", fail)


def run_job(out, *overrides, experiment="predictions", models="[{name: bagnet9_small}, {name: resnet_small}]"):
    return job.main(["--experiment", experiment, "--config", str(job.DEFAULT_CONFIG), f"output={out}", "run_id=t",
                     f"data.test_size={N_IMAGES}", "compute.batch_size=16", f"models={models}", *overrides])


@pytest.mark.parametrize("args, message", [
    ({"experiment": "nope"}, "--experiment: unknown experiment 'nope'"),
    ({"models": "[{name: resnet_big}]"}, r"models\[0\].name: unknown model 'resnet_big'"),
    ({"models": "[{name: vgg_small}, {name: vgg_small}]"}, "models: model 'vgg_small' is listed twice"),
    ({"models": "[{name: vgg_small, options: {aligned: true}}]"}, r"models\[0\].options.aligned: model 'vgg_small' has no option"),
    ({"models": "[{name: vgg_small, num_classes: 3}]"}, r"models\[0\].num_classes: vgg_small has 3 classes but the dataset has 10"),
    ({"overrides": ["experiments.predictions.topk=3"]}, "unknown config key 'experiments.predictions.topk'"),
    ({"overrides": ["experiments.shufle={}"]}, "experiments.shufle: unknown experiment"),
    ({"overrides": ["modules=[no_such_experiment_module]"]}, r"modules\[0\]: No module named 'no_such_experiment_module'"),
    ({"overrides": ["precision=fp16"]}, "precision: 'fp16' is not one of"),
    ({"overrides": ["split=holdout"]}, "split: 'holdout' is not one of"),
    ({"overrides": ["dataset.size=8"]}, "unknown config key 'dataset'"),
    ({"overrides": ["compute.wait_for_actors_s=0"]}, r"compute.wait_for_actors_s: must be >= 1 \(or null"),
    ({"models": "[{name: vgg_small, weights: results/train/nope/model.pt}]"},
     r"models\[0\].weights: file not found: results/train/nope/model.pt \(train it with `python jobs/train.py model.name=vgg_small"),
    ({"overrides": ["data.dataset=imagenet", "data.root=/nonexistent/imagenet"]}, "data.root: ImageNet root not found"),
    ({"experiment": "masking"}, "experiments.masking: needs model 'bagnet33_small' \\(bagnet\\) in the models list"),
    ({"experiment": "heatmaps", "models": "[{name: resnet_small}]"},
     r"experiments.heatmaps: applies to none of the models \(resnet_small\)"),
])
def test_bad_config_fails_before_ray(tmp_path, no_ray, args, message):
    with pytest.raises(SystemExit, match=message):
        run_job(tmp_path, *args.get("overrides", []), **{k: v for k, v in args.items() if k != "overrides"})
    assert not (tmp_path / "t").exists()


def test_all_experiments_leave_out_models_an_experiment_is_not_defined_for(tmp_path, capsys):
    cfg = load_config(ExperimentJobConfig, job.DEFAULT_CONFIG, [
        f"output={tmp_path}", "models=[{name: bagnet9_small}, {name: resnet_small}]",
        "experiments.masking.heatmap_model=bagnet9_small"])
    plan = evaluation.make_plan(cfg, evaluation.parse_experiments("all"), None)
    by_experiment: dict[str, list[str]] = {}
    for part in plan.parts:
        by_experiment.setdefault(part.experiment, []).append(part.model.name)
    assert list(by_experiment) == list(EXPERIMENTS)
    for name, models in by_experiment.items():
        applies_to = getattr(EXPERIMENTS[name], "applies_to", lambda model_name: True)
        assert models == [m for m in ("bagnet9_small", "resnet_small") if applies_to(m)], name
    assert by_experiment["heatmaps"] == ["bagnet9_small"]  # heatmaps need a BagNet
    assert "heatmaps: not defined for resnet_small; left out" in capsys.readouterr().out


def test_help_lists_the_registry(capsys):
    with pytest.raises(SystemExit):
        job.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(EXPERIMENTS) in text


def test_default_config_names_the_training_command(no_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/train here
    with pytest.raises(SystemExit, match=r"models\[0\].weights: file not found: results/train/bagnet9_small/model.pt"):
        job.main(["--experiment", "predictions"])


# --------------------------------------------------------------------------------------------
# end to end through Ray Data


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _save_weights(model: nn.Module) -> bytes:
    """A plain state_dict (no model spec), as checkpoints from elsewhere are."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_predictions_end_to_end_rerun_and_resume(ray_session, tmp_path, capsys):
    world = SyntheticWorld(seed=0, image_size=64)
    torch.manual_seed(3)
    resnet = create_model("resnet_small", num_classes=world.num_classes).eval()
    weights = tmp_path / "resnet.pt"
    weights.write_bytes(_save_weights(resnet))
    models = f"[{{name: bagnet9_small}}, {{name: resnet_small, weights: {weights}}}]"
    out = tmp_path / "out"
    summary = run_job(out, "compute.concurrent_models=2", models=models)  # both models' passes at once
    assert summary["computed"] == ["predictions/bagnet9_small", "predictions/resnet_small"]
    assert summary["rows"] == {"predictions": 2 * N_IMAGES} and summary["model_evals"] == 2 * N_IMAGES
    printed = capsys.readouterr().out
    assert "predictions/resnet_small: 32 rows" in printed and "model evaluations/s" in printed

    run_dir = out / "t"
    table_dir = run_dir / "predictions"
    df = pd.read_parquet(table_dir)
    assert sorted(df.columns) == sorted(columns(predictions))
    assert len(df) == 2 * N_IMAGES and not df.duplicated(["model", "image_id"]).any()
    arrow = pads.dataset(table_dir, partitioning="hive").to_table()
    assert sorted(arrow.column_names) == sorted(df.columns) and arrow.num_rows == len(df)
    df["model"] = df["model"].astype(str)
    by_model = {m: g.set_index("image_id").sort_index() for m, g in df.groupby("model")}
    b9, rn = by_model["bagnet9_small"], by_model["resnet_small"]
    assert (b9["weights"] == "random").all() and (rn["weights"] == str(weights)).all()
    assert (b9["q"] == 9).all() and rn["q"].isna().all()
    assert set(df["run_id"]) == {"t"} and set(df["dataset"]) == {"synthetic"} and set(df["split"]) == {"test"}
    assert set(df["precision"]) == {"fp32"} and set(df["experiment"].astype(str)) == {"predictions"}
    assert df["code_version"].str.len().min() > 0
    # rows match the model applied directly to the same images (ids and labels kept together)
    batch = world.batch(range(N_IMAGES), split="test")
    with torch.no_grad():
        logits = resnet(to_model_input(batch["image"]))
    expected = pd.Series(logits.gather(1, torch.as_tensor(batch["label"]).view(-1, 1)).squeeze(1).numpy(),
                         index=batch["image_id"]).sort_index()
    assert list(rn.index) == list(expected.index) and (rn["label"].to_numpy() == batch["label"][np.argsort(batch["image_id"])]).all()
    np.testing.assert_allclose(rn["label_logit"].to_numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-4)
    assert (rn["pred_top5"].map(lambda p: list(p)[0]).to_numpy() == logits.argmax(1).numpy()[np.argsort(batch["image_id"])]).all()
    assert len(predictions.error_consistency(df)) == 1

    manifest = json.loads((run_dir / "_SUCCESS").read_text())
    assert manifest["rows_per_table"] == {"predictions": 2 * N_IMAGES} and manifest["experiments"] == ["predictions"]
    assert manifest["config"]["data"]["test_size"] == N_IMAGES and manifest["timings"]["model_evals"] == 2 * N_IMAGES
    assert (run_dir / "config.yaml").is_file()
    times = _mtimes(run_dir)
    assert times["_SUCCESS"] == max(times.values())  # written last

    # a rerun skips every part and touches nothing
    again = run_job(out, models=models)
    assert again["computed"] == [] and again["rows"] == summary["rows"]
    assert _mtimes(run_dir) == times

    # an interrupted run: one part lost its marker and holds a stray file; the manifest is gone
    b9_dir = table_dir / "experiment=predictions" / "model=bagnet9_small"
    first_file = json.loads((b9_dir / "_SUCCESS").read_text())["files"][0]
    (b9_dir / "_SUCCESS").unlink()
    (b9_dir / "part-00009.parquet").write_bytes((b9_dir / first_file).read_bytes())
    (run_dir / "_SUCCESS").unlink()
    resumed = run_job(out, models=models)
    assert resumed["computed"] == ["predictions/bagnet9_small"] and resumed["skipped"] == ["predictions/resnet_small"]
    after = _mtimes(run_dir)
    assert all(after[k] == v for k, v in times.items() if "model=resnet_small" in k)
    assert not (b9_dir / "part-00009.parquet").exists()
    df2 = pd.read_parquet(table_dir)
    assert len(df2) == 2 * N_IMAGES and not df2.duplicated(["model", "image_id"]).any()
    assert after["_SUCCESS"] == max(after.values())

    # the same run_id with other settings is refused, naming the setting (the rule train and tune use)
    with pytest.raises(SystemExit, match=r"run_id: run .*t \(predictions/bagnet9_small\) already holds results "
                                         r"computed with other settings \(data.size: 32 before, 16 now\); set run_id"):
        run_job(out, "data.test_size=16", models=models)


def test_predictions_from_s3_to_s3(ray_session, s3_server, s3_bucket, tmp_path):
    from bagnet.synthetic import materialize

    world = SyntheticWorld(seed=0, image_size=64)
    root = f"s3://{s3_bucket}/imagenet"
    n = 2 * world.num_classes
    materialize(world, root, split="val", n=n, ext="jpg")
    storage.write_bytes_atomic(f"{root}/val/{world.class_names[1]}/corrupt.jpg", b"\xff\xd8 truncated")
    torch.manual_seed(4)
    weights = f"s3://{s3_bucket}/weights/bagnet9.pt"
    storage.write_bytes_atomic(weights, _save_weights(create_model("bagnet9_small", num_classes=world.num_classes)))
    output = f"s3://{s3_bucket}/results"
    summary = job.main(["--experiment", "predictions", "--config", str(job.DEFAULT_CONFIG), f"output={output}",
                        "run_id=s3run", "data.dataset=imagenet", f"data.root={root}", "split=val",
                        "data.image_size=64", "data.resize=64", "compute.batch_size=8",
                        # the shared Ray's workers started before the moto variables were set
                        "compute.forward_env=[AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]",
                        f"models=[{{name: bagnet9_small, weights: '{weights}'}}]"])
    assert summary["rows"] == {"predictions": n} and summary["run_dir"] == f"{output}/s3run"
    df = pd.read_parquet(f"{output}/s3run/predictions", storage_options=storage_options(s3_server))
    assert sorted(df.columns) == sorted(columns(predictions)) and len(df) == n
    assert set(df["dataset"]) == {"imagenet"} and set(df["weights"]) == {weights}
    class_of_id = df["image_id"].str.split("/").str[1].map(world.class_names.index)
    assert (class_of_id == df["label"]).all() and df["image_id"].str.startswith("val/").all()
    assert not df["image_id"].str.contains("corrupt").any()
    manifest = storage.read_json(f"{output}/s3run/_SUCCESS")
    assert manifest["rows_per_table"] == {"predictions": n, "failures": 1}  # the corrupt file, recorded
    assert summary["failures"] == {"predictions/bagnet9_small": 1}
    assert storage.exists(f"{output}/s3run/config.yaml")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server


def test_all_experiments_with_an_outside_module_end_to_end(ray_session, dummy_module, tmp_path):
    """`--experiment all` with a module added by the config's `modules:`: one pass over the images
    runs every experiment, each table reads back with its declared schema, and the outside
    module's Summary gets its report section."""
    out = tmp_path / "out"
    tiny = [f"experiments.{name}={params}" for name, params in TINY_PARAMS.items()]
    summary = run_job(out, *tiny, f"modules=[{dummy_module}]", "data.test_size=8", "compute.batch_size=8",
                      "compute.fast=true", "compute.torch_threads=2", "compute.wait_for_actors_s=300",
                      experiment="all", models="[{name: bagnet9_small}]")
    names = list(EXPERIMENTS)
    assert names[-1] == dummy_module
    assert summary["computed"] == sorted(f"{n}/bagnet9_small" for n in names)
    for name in names:
        module = EXPERIMENTS[name]
        table_dir = out / "t" / module.TABLE
        df = pd.read_parquet(table_dir)
        assert sorted(df.columns) == sorted(columns(module)), name
        for file in table_dir.rglob("*.parquet"):  # stored with exactly the declared schema
            assert pq.read_schema(file).remove_metadata() == results.table_schema(module.SCHEMA), (name, file)
        assert len(df) > 0 and set(df["image_id"]) == {f"synthetic/test/{i:06d}" for i in range(8)}, name
        assert summary["rows"][module.TABLE] == len(df) and (df["q"] == 9).all(), name
    probe = pd.read_parquet(out / "t" / dummy_module)
    assert sorted(probe["bucket"].unique()) == [0, 1]
    # all parts of the model came from one pass over the images (one pipeline, one actor pool)
    markers = [results.read_marker(str(out / "t" / EXPERIMENTS[n].TABLE / f"experiment={n}" / "model=bagnet9_small"))
               for n in names]
    assert {m["group"] for m in markers} == {"+".join(names) + "/bagnet9_small"}
    assert all(m["images"] == 8 and m["model_evals"] >= 8 and 0 < m["startup_s"] <= m["group_seconds"] for m in markers)
    manifest = json.loads((out / "t" / "_SUCCESS").read_text())
    assert set(manifest["rows_per_table"]) == set(EXPERIMENTS.tables().values())
    assert manifest["config"]["modules"] == [dummy_module]

    # analysis/ is imported here, not at the top: a report failure should not hide the runner tests
    from analysis.report import build_report

    index = build_report(str(out), str(tmp_path / "report"))
    assert DUMMY_TITLE in (Path(index).parent / "report.md").read_text()


def test_an_aligned_model_is_evaluated_as_trained(ray_session, tmp_path):
    """A bagnet17_small saved as training exports it (model.pt with its spec, here aligned=true;
    tests/test_train.py checks the export): the predictions experiment on it, with no options in
    the experiment config, gives that model's logits, not the unaligned function's."""
    torch.manual_seed(0)
    trained = create_model("bagnet17_small", num_classes=10, aligned=True)
    weights = str(tmp_path / "model.pt")
    storage.write_bytes_atomic(weights, model_bytes(trained, trained.model_spec))
    n = 16
    run_job(tmp_path / "out", f"data.test_size={n}", models=f"[{{name: bagnet17_small, weights: '{weights}'}}]")
    df = pd.read_parquet(tmp_path / "out" / "t" / "predictions").set_index("image_id").sort_index()

    model = create_model("bagnet17_small", weights=weights, aligned=True).eval()
    batch = SyntheticWorld(seed=0, image_size=64).batch(range(n), split="test")
    with torch.no_grad():
        logits = model(to_model_input(batch["image"]))
    labels = torch.as_tensor(batch["label"]).view(-1, 1)
    expected = pd.DataFrame({"label_logit": logits.gather(1, labels).squeeze(1).numpy(),
                             "max_logit": logits.max(1).values.numpy()}, index=batch["image_id"]).sort_index()
    assert list(df.index) == list(expected.index)
    for column in ("label_logit", "max_logit"):
        np.testing.assert_allclose(df[column].to_numpy(), expected[column].to_numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=column)
    unaligned = create_model("bagnet17_small", num_classes=10).eval()  # the function it was evaluated as before
    unaligned.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unaligned(to_model_input(batch["image"])), logits, atol=1e-3)


class FakePasses(Jobs):
    """Stands in for ``evaluation.run_group``: the fake jobs of tests/test_concurrency.py, one per
    group (named by its first part), returning one marker per part; those in ``fail`` raise a
    pool timeout."""

    def __init__(self, seconds: float | dict[str, float], fail: tuple[str, ...] = ()):
        super().__init__(seconds if isinstance(seconds, dict) else dict.fromkeys("abcd", seconds), fail,
                         GetTimeoutError)

    def __call__(self, plan, group, env, images):
        self.job(group[0])()
        return {f"predictions/{part}": {"rows": 1} for part in group}


def _plan(concurrent: int):
    return SimpleNamespace(cfg=load_config(ExperimentJobConfig, None, [
        "models=[{name: bagnet9_small}]", f"compute.concurrent_models={concurrent}"]))


@pytest.mark.parametrize("concurrent", [1, 2, 3])
def test_model_passes_run_concurrent_models_at_a_time(monkeypatch, concurrent):
    fake = FakePasses(0.3)
    monkeypatch.setattr(evaluation, "run_group", fake)
    totals = evaluation.RunTotals()
    evaluation.run_passes(_plan(concurrent), {m: [m] for m in "abcd"}, None, None, totals)
    assert fake.most == concurrent and sorted(fake.started) == list("abcd")
    assert sorted(totals.markers) == [f"predictions/{m}" for m in "abcd"]


def test_after_a_failed_pass_no_new_pass_starts_and_the_running_ones_are_kept(monkeypatch):
    """b's pool times out while a runs: a finishes and keeps its parts, d never starts (c may
    have taken b's place already), and the error names b's pool."""
    fake = FakePasses({"a": 1.5, "b": 0.1, "c": 1.0, "d": 0.1}, fail=("b",))
    monkeypatch.setattr(evaluation, "run_group", fake)
    totals = evaluation.RunTotals()
    with pytest.raises(evaluation.ActorPoolTimeout, match=r"the 1 replica\(s\) of b \(each num_cpus=1.0"):
        evaluation.run_passes(_plan(2), {m: [m] for m in "abcd"}, None, None, totals)
    assert "d" not in fake.started and fake.running == 0
    assert "predictions/a" in totals.markers and "predictions/b" not in totals.markers


def test_a_model_pool_the_cluster_cannot_place_fails_naming_its_resources(ray_session, tmp_path):
    """With compute.wait_for_actors_s the job stops (exit 1) instead of waiting forever for
    resources. It runs as its own driver, as a submitted job does: when it exits, Ray drops the
    pool's pending actor (in this process it would stay pending for the session's later tests)."""
    done = subprocess.run([sys.executable, "jobs/experiment.py", "--experiment", "predictions", f"output={tmp_path}",
                           "run_id=t", f"data.test_size={N_IMAGES}", "models=[{name: bagnet9_small}]",
                           "compute.num_cpus=64", "compute.wait_for_actors_s=2"],
                          cwd=ROOT, env=second_driver_env(ray_session), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"compute.wait_for_actors_s: the 1 replica\(s\) of bagnet9_small \(each num_cpus=64.0, "
                     r"num_gpus=0, memory_gb=1.0\) did not start within 2 s", done.stderr), done.stderr[-2000:]
    assert not list(tmp_path.rglob("_SUCCESS")) and not list(tmp_path.rglob("*.parquet"))
    # the shared Ray instance is free again: the job's pending replica went with its driver
    deadline = time.monotonic() + 60
    address = ray_session.get_runtime_context().gcs_address
    while pending := [a for a in list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10000)
                      if a.state != "ALIVE"]:
        assert time.monotonic() < deadline, pending
        time.sleep(0.5)
