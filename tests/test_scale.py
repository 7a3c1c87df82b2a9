"""The scale path: workers write, markers are verified, no image is lost silently, the images
are read once per run, the report streams (issue 14, and the result-verification items of 18)."""

import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis import report as R
from bagnet.experiments import heatmaps as heatmap_experiment
from bagnet.imagenet import ImageFolderIndex
from bagnet.synthetic import SyntheticWorld, materialize
from cluster import evaluation, images
from cluster.configs import ExperimentJobConfig
from bagnet.config import load_config
from jobs import experiment as job
from store import catalog, results, storage
from tests import make_tables as M
from tests.fault_proxy import FaultProxy

OWN = pa.schema([("value", pa.int64())])
COMMON = {"run_id": "r", "q": None, "weights": "random", "dataset": "synthetic", "split": "val", "seed": 0,
          "precision": "fp32", "code_version": "v"}


def _part(run_dir, model="m", files=2) -> tuple[str, dict]:
    path = results.part_dir(run_dir, "t", {"experiment": "e", "model": model})
    writer = results.PartWriter(path, max_file_bytes=1)  # one file per write
    for start in range(files):
        rows = [{"image_id": f"i{start}{k}", "label": k, "value": k} for k in range(3)]
        writer.write(results.rows_to_table(rows, {**COMMON, "created_at": results.utc_now()}, OWN, experiment="e"))
    return path, writer.commit({"fingerprint": {}})


# --------------------------------------------------------------------------------------------
# Markers: what they record, what verification finds


def test_a_marker_records_each_files_size_rows_and_checksum(tmp_path):
    path, marker = _part(str(tmp_path / "run"))
    assert marker["rows"] == 6 and marker["files"] == ["part-00000.parquet", "part-00001.parquet"]
    for name in marker["files"]:
        data = (tmp_path / "run" / "t" / "experiment=e" / "model=m" / name).read_bytes()
        check = results.file_check(name, data, 3)
        assert marker["checks"][name] == {k: check[k] for k in ("bytes", "rows", "sha256")}
    assert results.verify_part(path, marker) is None


@pytest.mark.parametrize("damage, problem", [
    ("truncate", r"part-00001.parquet holds \d+ bytes, its marker says \d+"),
    ("delete", "part-00001.parquet is missing"),
    ("flip", "part-00001.parquet does not match the checksum in its marker"),
])
def test_verification_names_the_damaged_file(tmp_path, damage, problem):
    run_dir = str(tmp_path / "run")
    path, marker = _part(run_dir)
    _part(run_dir, model="ok")
    target = os.path.join(path, "part-00001.parquet")
    data = open(target, "rb").read()
    if damage == "truncate":
        open(target, "wb").write(data[: len(data) // 2])
    elif damage == "delete":
        os.remove(target)
    else:
        open(target, "wb").write(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])
    assert re.fullmatch(problem, results.verify_part(path, marker))
    problems: dict[str, str] = {}
    parts = results.completed_parts(run_dir, problems)
    if damage == "flip":  # the size is unchanged: only the deep check (the rerun's) finds it
        assert len(parts) == 2 and not problems
    else:
        assert list(parts) == ["t/experiment=e/model=ok"]
        assert re.fullmatch(problem, problems["t/experiment=e/model=m"])
        run = next(r for r in catalog.discover(run_dir.rsplit("/", 1)[0]).runs)
        assert re.fullmatch(problem, run.damaged[path]) and not any(f.startswith(path) for f in run.committed("t"))


@pytest.mark.parametrize("content, message", [(b'{"rows": 3, "fi', "not a JSON marker"), (b"[1, 2]", "not a JSON object but list")])
def test_a_bad_marker_is_named(tmp_path, content, message):
    path, _ = _part(str(tmp_path / "run"))
    with open(os.path.join(path, results.MARKER), "wb") as f:
        f.write(content)
    with pytest.raises(results.MarkerError, match=re.escape(os.path.join(path, results.MARKER)) + ": " + message):
        results.read_marker(path)
    problems: dict[str, str] = {}
    assert results.completed_parts(str(tmp_path / "run"), problems) == {} and message in problems["t/experiment=e/model=m"]


def test_the_report_names_a_damaged_part_and_an_unreadable_training_run(tmp_path):
    root = tmp_path / "results"
    run_dir = M.write_run(root, "run-a", {"predictions": M.predictions()})
    part = run_dir / "predictions" / "experiment=predictions" / "model=resnet_small"
    victim = part / json.loads((part / "_SUCCESS").read_text())["files"][0]
    victim.write_bytes(victim.read_bytes()[:100])
    M.write_train_run(root / "train", "good", "bagnet9_small", [0.2, 0.4])
    bad = M.write_train_run(root / "train", "bad", "resnet_small", [0.1, 0.3])
    (bad / "metrics.parquet").write_bytes(b"PAR1 not really")
    index = R.build_report(str(root), str(tmp_path / "out"))
    md = (index.parent / "report.md").read_text()
    assert re.search(r"damaged part .*model=resnet_small \(not read: part-00000.parquet holds 100 bytes, its marker "
                     r"says \d+\); rerun the job to redo it", md)
    assert f"Training run {bad} could not be read and is left out" in md
    acc = [line for line in md.splitlines() if "bagnet9_small" in line and "training" in line]
    assert acc  # the good training run is still reported


# --------------------------------------------------------------------------------------------
# Reading images: I/O errors retried, never dropped


def _listing(tmp_path, n_per_class=1) -> tuple[ExperimentJobConfig, images.ImageSource, SyntheticWorld]:
    world = SyntheticWorld(seed=0, image_size=64)
    materialize(world, str(tmp_path / "inet"), split="val", n=n_per_class * world.num_classes, ext="png")
    cfg = load_config(ExperimentJobConfig, None, ["models=[{name: bagnet9_small}]", "data.dataset=imagenet",
                                                  f"data.root={tmp_path / 'inet'}", "data.image_size=56",
                                                  "data.resize=64"])
    return cfg, images.describe(cfg.data, cfg.split), world


def test_a_transient_read_error_is_retried_not_dropped(tmp_path, monkeypatch):
    cfg, source, _ = _listing(tmp_path)
    flaky = source.files["path"][3].as_py()
    real, failed = storage.read_bytes, []

    def read_bytes(path):
        if path == flaky and not failed:
            failed.append(path)
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject")
        return real(path)

    monkeypatch.setattr(images.storage, "read_bytes", read_bytes)
    monkeypatch.setattr(images, "READ_BACKOFF_S", 0.01)
    batch = {k: source.files[k].to_numpy(zero_copy_only=False) for k in ("path", "label", "image_id")}
    out = images._imagenet_images(batch, size=56, resize=64, augment=False, keep_failures=True)
    assert failed == [flaky] and len(out["image_id"]) == source.num_images
    assert out["reads"].tolist() == [2 if i == 3 else 1 for i in range(source.num_images)]
    assert set(out["error"]) == {""}


def test_a_persistent_read_error_names_the_path(tmp_path, monkeypatch):
    cfg, source, _ = _listing(tmp_path)
    gone = source.files["path"][2].as_py()
    os.remove(gone)
    batch = {k: source.files[k].to_numpy(zero_copy_only=False) for k in ("path", "label", "image_id")}
    with pytest.raises(images.ImageReadError, match=f"cannot read image {re.escape(gone)} after 2 attempts"):
        monkeypatch.setattr(images, "READ_ATTEMPTS", 2)
        images._imagenet_images(batch, size=56, resize=64, augment=False, keep_failures=True)


# --------------------------------------------------------------------------------------------
# End to end: failures accounted, images read once, the report over the real producers' tree


def _bad_files(root: str, world: SyntheticWorld) -> list[str]:
    bad = [storage.join(root, "val", world.class_names[1], "corrupt.png"),
           storage.join(root, "val", world.class_names[2], "empty.png")]
    storage.write_bytes_atomic(bad[0], b"\x89PNG\r\n\x1a\n truncated")
    storage.write_bytes_atomic(bad[1], b"")
    return bad


def _run(root: str, output: str, experiments: str, *extra: str) -> dict:
    return job.main(["--experiment", experiments, "--config", str(job.DEFAULT_CONFIG), f"output={output}",
                     "run_id=scale", "data.dataset=imagenet", f"data.root={root}", "split=val",
                     "data.image_size=64", "data.resize=64", "compute.batch_size=8", "data.read_batch_size=8",
                     "experiments.heatmaps={resolution: coarse}", "compute.torch_threads=1",
                     "models=[{name: bagnet9_small}, {name: resnet_small}]", *extra])


@pytest.mark.slow
def test_failures_are_accounted_images_read_once_and_reported(ray_session, tmp_path, capsys):
    world = SyntheticWorld(seed=0, image_size=64)
    root, output = str(tmp_path / "inet"), str(tmp_path / "out")
    n = 2 * world.num_classes
    materialize(world, root, split="val", n=n, ext="png")
    bad = _bad_files(root, world)
    summary = _run(root, output, "predictions,heatmaps")
    listed = n + len(bad)
    # every listed image is evaluated or a failure, per part; each file read once for both models
    assert summary["rows"] == {"predictions": 2 * n, "heatmaps": n}
    assert summary["failures"] == {"predictions/bagnet9_small": 2, "predictions/resnet_small": 2,
                                   "heatmaps/bagnet9_small": 2}
    assert summary["reads"] == {"images": listed, "reads": listed, "undecodable": 2}
    printed = capsys.readouterr().out
    assert f"read and decoded {listed} images once for every model" in printed
    run_dir = storage.join(output, "scale")
    failures = pd.read_parquet(storage.join(run_dir, results.FAILURES_TABLE))
    assert sorted(set(failures["path"])) == sorted(bad) and set(failures["stage"]) == {"decode"}
    assert len(failures) == 6 and failures["error"].str.contains("cannot decode image").all()
    for rel, marker in results.completed_parts(run_dir).items():
        if not rel.startswith(results.FAILURES_TABLE):
            assert marker["images"] + marker["failures"] == listed, rel
    # only the markers' files were written: nothing of the rows went through the driver
    hm = pd.read_parquet(storage.join(run_dir, "heatmaps"))
    for row in hm.head(3).itertuples():
        values = np.asarray(row.values, np.float32).reshape(row.height, row.width)
        assert heatmap_experiment.summarize(values) == pytest.approx(
            {"peak_i": row.peak_i, "peak_j": row.peak_j, "peak_value": row.peak_value, "top_evidence": row.top_evidence})

    # the report over this tree: failures named, heatmaps drawn over the photos read back
    index = R.build_report(output, str(tmp_path / "report"))
    md = (index.parent / "report.md").read_text()
    assert "2 image(s) could not be decoded and are not in these results (table `failures` of run scale)" in md
    assert f"Images read from {root}" in md and "patches_bagnet9_small.png" in md

    # a rerun finds a truncated part, withdraws the manifest, redoes that part only and republishes
    part = storage.join(run_dir, "predictions", "experiment=predictions", "model=resnet_small")
    name = results.read_marker(part)["files"][0]
    data = storage.read_bytes(storage.join(part, name))
    storage.write_bytes_atomic(storage.join(part, name), data[:-10])
    again = _run(root, output, "predictions,heatmaps")
    assert again["computed"] == ["predictions/resnet_small"] and again["rows"] == summary["rows"]
    printed = capsys.readouterr().out
    assert f"predictions/resnet_small: the finished part is damaged ({name} holds" in printed
    assert "manifest withdrawn" in printed
    assert storage.read_json(storage.join(run_dir, results.MARKER))["rows_per_table"] == {
        "predictions": 2 * n, "heatmaps": n, "failures": 6}

    # a persistent read error stops the job naming the file; the finished parts stay
    gone = storage.join(root, "val", world.class_names[4], "000004.png")
    part = storage.join(run_dir, "heatmaps", "experiment=heatmaps", "model=bagnet9_small")
    storage.delete(storage.join(part, results.MARKER))
    plan = evaluation.make_plan(load_config(ExperimentJobConfig, str(job.DEFAULT_CONFIG), [
        f"output={output}", "run_id=scale", "data.dataset=imagenet", f"data.root={root}", "split=val",
        "data.image_size=64", "data.resize=64", "experiments.heatmaps={resolution: coarse}",
        "models=[{name: bagnet9_small}, {name: resnet_small}]"]), ["predictions", "heatmaps"], None)
    storage.delete(gone)  # listed with the plan, then gone: every read fails
    with pytest.raises(images.ImageReadError, match=f"^cannot read image {re.escape(gone)} after "
                                                   f"{images.READ_ATTEMPTS} attempts .* a rerun resumes$"):
        evaluation.run_plan(plan)
    assert results.read_marker(storage.join(run_dir, "predictions", "experiment=predictions",
                                            "model=bagnet9_small")) is not None
    assert not storage.exists(storage.join(run_dir, results.MARKER))


@pytest.mark.slow
def test_s3_errors_injected_through_a_proxy_are_retried_or_stop_the_job(ray_session, s3_server, s3_bucket,
                                                                       monkeypatch):
    """The job's Ray workers read the images over S3 through a proxy that answers GETs of chosen
    keys with 503 SlowDown: pyarrow's client retries each request itself (S3_REQUEST_ATTEMPTS),
    images.read_with_retry retries whole reads on top; a persistent error stops the job."""
    world = SyntheticWorld(seed=0, image_size=64)
    root, output = f"s3://{s3_bucket}/inet", f"s3://{s3_bucket}/out"
    n = world.num_classes
    materialize(world, root, split="val", n=n, ext="png")
    bad = _bad_files(root, world)
    listed = n + len(bad)
    image = [storage.join(root, "val", world.class_names[k], f"{k:06d}.png") for k in range(3)]
    attempts = storage.S3_REQUEST_ATTEMPTS
    forward = "compute.forward_env=[AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]"
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the driver's and (forwarded) the workers' endpoint
        proxy.fail(image[0], 1)  # within one request's attempts: pyarrow's client retries it
        proxy.fail(image[1], attempts)  # every attempt of the first read: the reader reads again
        summary = _run(root, output, "predictions", "models=[{name: resnet_small}]", forward)
        assert proxy.statuses(image[0]) == [503, 206] and proxy.statuses(image[1]) == [503] * attempts + [206]
        # one read more than listed: the second image's; nothing dropped, every image accounted
        assert summary["reads"] == {"images": listed, "reads": listed + 1, "undecodable": len(bad)}
        assert summary["rows"] == {"predictions": n} and summary["failures"] == {"predictions/resnet_small": 2}
        run = next(r for r in catalog.discover(output).runs)
        ids = set(catalog.read_table(run, "predictions", columns=["image_id"])["image_id"].to_pylist())
        assert {f"val/{world.class_names[k]}/{k:06d}.png" for k in (0, 1)} <= ids and len(ids) == n
        assert sorted(catalog.read_table(run, results.FAILURES_TABLE)["path"].to_pylist()) == sorted(bad)
        part = storage.join(output, "scale", "predictions", "experiment=predictions", "model=resnet_small")
        marker = results.read_marker(part)
        assert marker["images"] + marker["failures"] == listed

        # every GET of one image fails: the job stops naming it, before any model's pass; the
        # finished part is kept (a second model is what is left to compute)
        proxy.fail(image[2], -1)
        with pytest.raises(SystemExit, match=f"^error: cannot read image {re.escape(image[2])} after "
                                             f"{images.READ_ATTEMPTS} attempts \\(OSError: AWS Error SLOW_DOWN"):
            _run(root, output, "predictions", "models=[{name: resnet_small}, {name: bagnet9_small}]", forward)
        assert proxy.statuses(image[2]) == [503] * (images.READ_ATTEMPTS * attempts)
        assert results.read_marker(part) == marker and results.verify_part(part, marker, deep=True) is None
        assert not storage.exists(storage.join(output, "scale", results.MARKER))


def test_training_records_the_images_it_skips_once(tmp_path):
    cfg, source, world = _listing(tmp_path)
    bad = _bad_files(str(tmp_path / "inet"), world)
    source = images.describe(cfg.data, cfg.split)
    batch = {k: source.files[k].to_numpy(zero_copy_only=False) for k in ("path", "label", "image_id")}
    decoded = images._imagenet_images(batch, size=56, resize=64, augment=True, keep_failures=True)
    run_dir = str(tmp_path / "train-run")
    for _ in range(2):  # two epochs meet the same files
        kept = images._drop_failures(decoded, record_to=run_dir)
    assert len(kept["label"]) == source.num_images - 2 and set(kept) == {"image", "label"}
    skipped = images.skipped_images(run_dir)
    assert sorted(skipped["path"].to_pylist()) == sorted(bad)
    assert all("cannot decode image" in e for e in skipped["error"].to_pylist())
    assert not catalog.discover(str(tmp_path)).unrecognised  # readers skip the records (names start with _)


def test_the_parallel_listing_matches_the_index(tmp_path):
    world = SyntheticWorld(seed=0, image_size=64)
    root = str(tmp_path / "inet")
    materialize(world, root, split="val", n=37, ext="png")
    nested = tmp_path / "inet" / "val" / world.class_names[3] / "sub"
    nested.mkdir()
    (nested / "x.PNG").write_bytes(b"x")
    (nested.parent / "notes.txt").write_text("not an image")
    index = ImageFolderIndex(root, "val")
    classes, files = images.list_split(root, "val")
    assert classes == index.classes and files["path"].to_pylist() == [p for p, _ in index.samples]
    assert files["label"].to_pylist() == index.targets and files["image_id"][0].as_py() == "val/local0/000000.png"
    (tmp_path / "inet" / "val" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images .* in 1 class folder\(s\): .*/val/empty"):
        images.list_split(root, "val")


def test_an_actor_writes_its_rows_itself_in_files_of_the_configured_size(tmp_path):
    from tests.test_experiment_runner import _actor, _batch

    actor = _actor({"heatmaps": {"resolution": "full"}}, out=tmp_path)
    actor.max_file_bytes = 40_000  # a 64 x 64 float32 map is 16 KiB: about two maps a file
    batch = _batch(6)
    batch["error"] = np.asarray(["", "", "cannot decode image x: bad", "", "", ""])
    batch["path"] = np.asarray([f"/data/{i}.png" for i in range(6)])
    out = actor(batch)
    files = json.loads(out[evaluation.COL_FILE][0])
    assert len(files) >= 3 and sum(f["rows"] for f in files) == 5 == out[evaluation.COL_IMAGES][0]
    for f in files:
        data = (tmp_path / "heatmaps" / f["name"]).read_bytes()
        assert f == results.file_check(f["name"], data, f["rows"])
    (failure,) = json.loads(out[evaluation.COL_FAILURE_FILE][0])
    rows = pd.read_parquet(tmp_path / "heatmaps-failures" / failure["name"])
    assert rows[["path", "stage", "image_id"]].values.tolist() == [["/data/2.png", "decode", "synthetic/test/000002"]]
    assert out[evaluation.COL_FAILURES][0] == 1 and rows["error"][0] == "cannot decode image x: bad"
