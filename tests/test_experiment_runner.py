"""jobs/experiment.py: config checks, result tables, resume; bagnet.experiments registry and predictions."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from torch import nn

from bagnet.imagenet import to_model_input
from bagnet.synthetic import SyntheticWorld, materialize
from bagnet.experiments import EXPERIMENTS, NAMES, ExperimentContext, ExperimentRegistry, ExperimentUnavailable
from bagnet.experiments import predictions
from bagnet.models import create_model
from bagnet.config import load_config
from store import results, storage
from jobs import experiment as job
from tests.fixtures_s3 import storage_options

COMMON = ["run_id", "experiment", "model", "q", "weights", "dataset", "split", "image_id", "label",
          "seed", "precision", "created_at", "code_version"]
PREDICTION_COLUMNS = ["pred_top5", "correct_top1", "correct_top5", "label_logit", "max_logit"]
N_IMAGES = 32


# --------------------------------------------------------------------------------------------
# registry and the predictions experiment (no Ray)


def test_registry_is_lazy_and_checks_the_contract():
    assert set(NAMES) == {"predictions", "heatmaps", "shuffle", "interaction", "masking"}
    assert list(EXPERIMENTS) == list(NAMES) and "shuffle" in EXPERIMENTS and "nope" not in EXPERIMENTS
    module = EXPERIMENTS["predictions"]
    assert module.TABLE == "predictions" and module.run is predictions.run
    with pytest.raises(KeyError, match="unknown experiment 'nope'; known: predictions, heatmaps"):
        EXPERIMENTS["nope"]
    registry = ExperimentRegistry(("predictions", "not_written_yet"))
    assert "not_written_yet" in registry and registry.available() == ["predictions"]
    with pytest.raises(ExperimentUnavailable, match="bagnet/experiments/not_written_yet.py"):
        registry["not_written_yet"]
    assert registry["predictions"] is module  # a missing module does not break the others


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
    run_dir = str(tmp_path / "run")
    for model, q in (("bagnet9_small", 9), ("resnet_small", None)):
        part = results.part_dir(run_dir, "predictions", {"experiment": "predictions", "model": model})
        writer = results.PartWriter(part, max_file_bytes=1)  # one file per write
        for start in (0, 2):
            rows = [{"image_id": f"i{i}", "label": i, "pred_top5": [i, 0], "correct_top1": True}
                    for i in range(start, start + 2)]
            writer.write(results.rows_to_table(rows, _common(q=q)))
        assert results.read_marker(part) is None
        marker = writer.commit({"fingerprint": {"x": 1}})
        assert marker["rows"] == 4 and marker["files"] == ["part-00000.parquet", "part-00001.parquet"]
    table_dir = tmp_path / "run" / "predictions"
    df = pd.read_parquet(table_dir)
    assert sorted(df.columns) == sorted([*COMMON, "pred_top5", "correct_top1"])
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


def test_unreadable_images_are_logged_and_dropped(tmp_path, caplog):
    world = SyntheticWorld(seed=0, image_size=64)
    n = world.num_classes  # ImageFolderIndex wants every class folder non-empty
    materialize(world, str(tmp_path), split="val", n=n, ext="png")
    bad = tmp_path / "val" / world.class_names[0] / "broken.png"
    bad.write_bytes(b"not an image")
    source = job.describe_source(job.DatasetSpec(name="imagenet", root=str(tmp_path), image_size=56, resize=64))
    assert source.num_images == n + 1 and source.num_classes == world.num_classes
    batch = {k: np.array([it[k] for it in source.items]) for k in ("path", "label", "image_id")}
    out = job._imagenet_images(batch, root=str(tmp_path), size=56, resize=64)
    assert out["image"].shape == (n, 56, 56, 3) and out["image"].dtype == np.uint8
    assert "val/local0/broken.png" not in out["image_id"].tolist() and "val/local0/000000.png" in out["image_id"]
    assert str(bad) in caplog.text


def _actor_rows(fast: bool, experiments: dict[str, dict], batch: dict) -> tuple[dict, dict[str, pd.DataFrame]]:
    spec = {"name": "bagnet9_small", "weights": None, "num_classes": None}
    actor = job.ModelActor(experiments=experiments, model=spec, helpers={"bagnet": dict(spec)}, num_classes=10,
                           use_gpu=False, precision="fp32", seed=0, forward_batch_size=8, common=_common(q=9),
                           fast=fast, torch_threads=1)
    out = actor(batch)
    assert set(out) == set(job.COLUMNS) and all(len(v) == len(experiments) for v in out.values())
    return out, {name: results.table_from_ipc(payload).to_pandas()
                 for name, payload in zip(out[job.COL_EXPERIMENT], out[job.COL_ROWS])}


def test_model_actor_runs_every_experiment_of_its_model_and_the_fast_path_agrees():
    """One actor call: a row per experiment (its Arrow rows, images, model evaluations, seconds),
    the same rows as each experiment run alone; compute.fast gives the same numbers."""
    world = SyntheticWorld(seed=0, image_size=64)
    b = world.batch(range(6), split="test")
    batch = {"image": b["image"], "label": b["label"], "image_id": np.asarray(b["image_id"])}
    experiments = {"predictions": {}, "heatmaps": {"resolution": "full"}, "shuffle": {"tiles": [16], "num_perms": 1},
                   "interaction": {"region_sizes": [8], "distances": [0, 16], "pairs_per_distance": 1},
                   "masking": {"rankings": ["random", "bagnet_heatmap"], "ks": [0, 2], "heatmap_model": "bagnet9_small"}}
    out, eager = _actor_rows(False, experiments, batch)
    assert list(out[job.COL_EXPERIMENT]) == list(experiments) and (out[job.COL_IMAGES] == 6).all()
    # evaluations counted per experiment: 1 per image; shuffle the original + 1 tiling; masking 2 rankings x 2 ks
    evals = dict(zip(out[job.COL_EXPERIMENT], out[job.COL_EVALS]))
    assert evals["predictions"] == 6 and evals["shuffle"] == 12 and evals["masking"] >= 4 * 6
    assert (out[job.COL_SECONDS] > 0).all()
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


# --------------------------------------------------------------------------------------------
# config errors: all raised before any Ray work


@pytest.fixture
def no_ray(monkeypatch):
    import cluster.ray_env

    def fail(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster.ray_env, "init_ray", fail)


def run_job(out, *overrides, experiment="predictions", models="[{name: bagnet9_small}, {name: resnet_small}]"):
    return job.main(["--experiment", experiment, "--config", str(job.DEFAULT_CONFIG), f"output={out}", "run_id=t",
                     f"dataset.size={N_IMAGES}", "compute.batch_size=16", f"models={models}", *overrides])


@pytest.mark.parametrize("args, message", [
    ({"experiment": "nope"}, "--experiment: unknown experiment 'nope'"),
    ({"models": "[{name: resnet_big}]"}, r"models\[0\].name: unknown model 'resnet_big'"),
    ({"models": "[{name: vgg_small}, {name: vgg_small}]"}, "models: model 'vgg_small' is listed twice"),
    ({"overrides": ["experiments.predictions.topk=3"]}, "unknown config key 'experiments.predictions.topk'"),
    ({"overrides": ["experiments.shufle={}"]}, "experiments.shufle: unknown experiment"),
    ({"overrides": ["precision=fp16"]}, "precision: 'fp16' is not one of"),
    ({"overrides": ["dataset.split=holdout"]}, "dataset.split: 'holdout' is not one of"),
    ({"overrides": ["compute.wait_for_actors_s=0"]}, r"compute.wait_for_actors_s: must be >= 1 \(or null"),
    ({"models": "[{name: vgg_small, weights: results/train/nope/model.pt}]"},
     r"models\[0\].weights: file not found: results/train/nope/model.pt \(train it with `python jobs/train.py model.name=vgg_small"),
    ({"overrides": ["dataset.name=imagenet", "dataset.root=/nonexistent/imagenet"]}, "dataset.root: ImageNet root not found"),
    ({"experiment": "masking"}, "experiments.masking: needs model 'bagnet33_small' \\(bagnet\\) in the models list"),
    ({"experiment": "heatmaps", "models": "[{name: resnet_small}]"},
     r"experiments.heatmaps: applies to none of the models \(resnet_small\)"),
])
def test_bad_config_fails_before_ray(tmp_path, no_ray, args, message):
    with pytest.raises(SystemExit, match=message):
        run_job(tmp_path, *args.get("overrides", []), **{k: v for k, v in args.items() if k != "overrides"})
    assert not (tmp_path / "t").exists()


def test_all_experiments_leave_out_models_an_experiment_is_not_defined_for(tmp_path, capsys):
    cfg = load_config(job.ExperimentJobConfig, job.DEFAULT_CONFIG, [
        f"output={tmp_path}", "models=[{name: bagnet9_small}, {name: resnet_small}]",
        "experiments.masking.heatmap_model=bagnet9_small"])
    plan = job.make_plan(cfg, job.parse_experiments("all"), None)
    by_experiment = {}
    for part in plan.parts:
        by_experiment.setdefault(part.experiment, []).append(part.model.name)
    assert by_experiment.pop("heatmaps") == ["bagnet9_small"]  # heatmaps need a BagNet
    assert all(models == ["bagnet9_small", "resnet_small"] for models in by_experiment.values()), by_experiment
    assert "heatmaps: not defined for resnet_small; left out" in capsys.readouterr().out


def test_default_config_names_the_training_command(no_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results/train here
    with pytest.raises(SystemExit, match=r"models\[0\].weights: file not found: results/train/bagnet9_small/model.pt"):
        job.main(["--experiment", "predictions"])


# --------------------------------------------------------------------------------------------
# end to end through Ray Data


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _save_weights(model: nn.Module) -> bytes:
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
    summary = run_job(out, models=models)
    assert summary["computed"] == ["predictions/bagnet9_small", "predictions/resnet_small"]
    assert summary["rows"] == {"predictions": 2 * N_IMAGES} and summary["model_evals"] == 2 * N_IMAGES
    printed = capsys.readouterr().out
    assert "predictions/resnet_small: 32 rows" in printed and "model evaluations/s" in printed

    run_dir = out / "t"
    table_dir = run_dir / "predictions"
    df = pd.read_parquet(table_dir)
    assert sorted(df.columns) == sorted(COMMON + PREDICTION_COLUMNS)
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
    assert manifest["config"]["dataset"]["size"] == N_IMAGES and manifest["timings"]["model_evals"] == 2 * N_IMAGES
    assert (run_dir / "config.yaml").is_file()
    times = _mtimes(run_dir)
    assert times["_SUCCESS"] == max(times.values())  # written last

    # a rerun skips every part and touches nothing
    again = run_job(out, models=models)
    assert again["computed"] == [] and again["rows"] == summary["rows"]
    assert _mtimes(run_dir) == times

    # an interrupted run: one part lost its marker and holds a stray file; the manifest is gone
    b9_dir = table_dir / "experiment=predictions" / "model=bagnet9_small"
    (b9_dir / "_SUCCESS").unlink()
    (b9_dir / "part-00009.parquet").write_bytes((b9_dir / "part-00000.parquet").read_bytes())
    (run_dir / "_SUCCESS").unlink()
    resumed = run_job(out, models=models)
    assert resumed["computed"] == ["predictions/bagnet9_small"] and resumed["skipped"] == ["predictions/resnet_small"]
    after = _mtimes(run_dir)
    assert all(after[k] == v for k, v in times.items() if "model=resnet_small" in k)
    assert not (b9_dir / "part-00009.parquet").exists()
    df2 = pd.read_parquet(table_dir)
    assert len(df2) == 2 * N_IMAGES and not df2.duplicated(["model", "image_id"]).any()
    assert after["_SUCCESS"] == max(after.values())

    # the same run_id with other settings is refused, naming the setting
    with pytest.raises(SystemExit, match=r"dataset.size: 32 in the finished part, 16 now"):
        run_job(out, "dataset.size=16", models=models)


def test_predictions_from_s3_to_s3(ray_session, s3_server, s3_bucket, tmp_path):
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
                        "run_id=s3run", "dataset.name=imagenet", f"dataset.root={root}", "dataset.split=val",
                        "dataset.image_size=64", "dataset.resize=64", "compute.batch_size=8",
                        # the shared Ray's workers started before the moto variables were set
                        "compute.forward_env=[AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]",
                        f"models=[{{name: bagnet9_small, weights: '{weights}'}}]"])
    assert summary["rows"] == {"predictions": n} and summary["run_dir"] == f"{output}/s3run"
    df = pd.read_parquet(f"{output}/s3run/predictions", storage_options=storage_options(s3_server))
    assert sorted(df.columns) == sorted(COMMON + PREDICTION_COLUMNS) and len(df) == n
    assert set(df["dataset"]) == {"imagenet"} and set(df["weights"]) == {weights}
    class_of_id = df["image_id"].str.split("/").str[1].map(world.class_names.index)
    assert (class_of_id == df["label"]).all() and df["image_id"].str.startswith("val/").all()
    assert not df["image_id"].str.contains("corrupt").any()
    manifest = storage.read_json(f"{output}/s3run/_SUCCESS")
    assert manifest["rows_per_table"] == {"predictions": n}
    assert storage.exists(f"{output}/s3run/config.yaml")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server


TABLE_COLUMNS = {  # shared/DESIGN.md
    "shuffle": ["tile", "perm_seed", "correct_top1", "correct_top5", "label_logit", "label_logit_delta"],
    "interaction": ["patch_size", "a_y", "a_x", "b_y", "b_x", "distance", "delta_a", "delta_b", "delta_ab",
                    "interaction"],
    "masking": ["ranking", "k_masked", "label_logit", "label_logit_delta", "correct_top5"],
    "heatmaps": ["target", "height", "width", "values"],
}
TINY_PARAMS = [
    "experiments.heatmaps={resolution: coarse}",
    "experiments.shuffle={tiles: [16], num_perms: 1}",
    "experiments.interaction={region_sizes: [8], distances: [0, 16], pairs_per_distance: 1}",
    "experiments.masking={rankings: [random, bagnet_heatmap], ks: [0, 2], heatmap_model: bagnet9_small}",
]


def test_other_experiments_end_to_end(ray_session, tmp_path):
    """One tiny part of every other experiment: the runner's columns plus each table's own."""
    names = [n for n in NAMES if n != "predictions"]
    summary = run_job(tmp_path, *TINY_PARAMS, "dataset.size=8", "compute.batch_size=8", "compute.fast=true",
                      "compute.torch_threads=2", "compute.wait_for_actors_s=300", experiment=",".join(names),
                      models="[{name: bagnet9_small}]")
    assert summary["computed"] == sorted(f"{n}/bagnet9_small" for n in names)
    for name in names:
        table = EXPERIMENTS[name].TABLE
        df = pd.read_parquet(tmp_path / "t" / table)
        assert set(COMMON + TABLE_COLUMNS[name]) <= set(df.columns), (name, sorted(df.columns))
        assert len(df) > 0 and set(df["image_id"]) == {f"synthetic/test/{i:06d}" for i in range(8)}
        assert summary["rows"][table] == len(df) and (df["q"] == 9).all()
    # all parts of the model came from one pass over the images (one pipeline, one actor pool)
    markers = [results.read_marker(str(tmp_path / "t" / EXPERIMENTS[n].TABLE / f"experiment={n}" / "model=bagnet9_small"))
               for n in names]
    assert {m["group"] for m in markers} == {"+".join(names) + "/bagnet9_small"}
    assert all(m["images"] == 8 and m["model_evals"] >= 8 and 0 < m["startup_s"] <= m["group_seconds"] for m in markers)
    manifest = json.loads((tmp_path / "t" / "_SUCCESS").read_text())
    assert set(manifest["rows_per_table"]) == {EXPERIMENTS[n].TABLE for n in names}
    assert list(manifest["timings"]["groups_s"]) == [markers[0]["group"]]


def test_a_model_pool_the_cluster_cannot_place_fails_naming_its_resources(ray_session, tmp_path):
    """With compute.wait_for_actors_s the job stops instead of waiting forever for resources."""
    with pytest.raises(SystemExit, match=r"compute.wait_for_actors_s: the 1 replica\(s\) of bagnet9_small "
                                         r"\(each num_cpus=64.0, num_gpus=0, memory_gb=1.0\) did not start within 2 s"):
        run_job(tmp_path, "compute.num_cpus=64", "compute.wait_for_actors_s=2", models="[{name: bagnet9_small}]")
    assert not list(tmp_path.rglob("_SUCCESS")) and not list(tmp_path.rglob("*.parquet"))
    # the shared Ray instance is free again: the same job with a pool that fits completes
    assert run_job(tmp_path, "dataset.size=8", "compute.batch_size=8",
                   models="[{name: bagnet9_small}]")["computed"] == ["predictions/bagnet9_small"]
