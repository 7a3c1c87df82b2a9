"""Nothing lost, mixed or executed from storage (issue 18): class lists, safe names, content
digests in fingerprints, the run lock, refused resumes, values that used to fail only after Ray
started, and files named in errors. No Ray: every check here runs before a job starts Ray."""

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from PIL import Image

from bagnet.config import ConfigError, dump_yaml, load_config, parse_yaml
from bagnet.models import ModelSpec, create_model, model_bytes
from bagnet.training import EpochStats, OptimConfig, make_optimizer
from cluster import evaluation, sweep, training
from cluster.configs import DataConfig, ExperimentJobConfig, ModelConfig, TrainJobConfig, check_output
from cluster.images import check_paths, describe
from jobs import experiment as experiment_job
from jobs import train as train_job
from jobs import tune as tune_job
from store import lock, storage

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CLASSES = DataConfig().world().class_names


def jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)).save(path)


def imagenet(root: Path, train: list[str], val: list[str]) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            for i in range(2):
                jpeg(root / split / c / f"{c}_{i}.JPEG")
    return root


def weights_file(path: Path, classes: list[str] | None = SYNTHETIC_CLASSES, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("bagnet9_small", num_classes=10)
    path.write_bytes(model_bytes(model, ModelSpec("bagnet9_small", 10, {}, classes)))
    return path


def experiment_cfg(tmp_path, *overrides):
    return load_config(ExperimentJobConfig, None, [f"output={tmp_path / 'exp'}", "data.test_size=8", "split=test",
                                                   "run_id=r", *overrides])


# --------------------------------------------------------------------------------------------
# 1. class lists


def test_train_and_val_with_different_class_folders_are_refused_naming_them(tmp_path):
    root = imagenet(tmp_path / "inet", ["n01", "n03"], ["n01", "n02", "n03"])
    with pytest.raises(ConfigError, match=r"missing in val: none; missing in train: n02"):
        check_paths(load_config(DataConfig, None, ["dataset=imagenet", f"root={root}"]))


def test_matching_splits_are_listed_once_with_their_classes(tmp_path):
    root = imagenet(tmp_path / "inet", ["n01", "n02"], ["n01", "n02"])
    train, val = check_paths(load_config(DataConfig, None, ["dataset=imagenet", f"root={root}"]))
    assert train.class_names == val.class_names == ["n01", "n02"] and train.num_images == 4


def test_empty_training_class_folder_is_refused_before_ray(tmp_path):
    root = imagenet(tmp_path / "inet", ["n01", "n02"], ["n01", "n02"])
    (root / "train" / "n03").mkdir()
    with pytest.raises(ConfigError, match=r"no images .* in 1 class folder\(s\): .*train/n03"):
        check_paths(load_config(DataConfig, None, ["dataset=imagenet", f"root={root}"]))


def test_training_saves_the_datasets_class_list_in_the_spec():
    cfg = load_config(TrainJobConfig, None, ["model.name=bagnet9_small"])
    data = training.TrainData(None, None, 10, SYNTHETIC_CLASSES, 8)
    assert training.model_spec(cfg, data).classes == SYNTHETIC_CLASSES


def test_experiment_refuses_weights_trained_on_other_classes(tmp_path):
    other = [*SYNTHETIC_CLASSES[:3], "zebra", *SYNTHETIC_CLASSES[4:]]
    w = weights_file(tmp_path / "w.pt", other)
    cfg = experiment_cfg(tmp_path, f"models=[{{name: bagnet9_small, weights: {w}}}]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.weights: .*label 3 is 'zebra' in the weights"):
        evaluation.make_plan(cfg, ["predictions"], None)
    same = experiment_cfg(tmp_path, f"models=[{{name: bagnet9_small, weights: {weights_file(tmp_path / 's.pt')}}}]")
    assert evaluation.make_plan(same, ["predictions"], None).parts


# --------------------------------------------------------------------------------------------
# 2. nothing unpickled from storage


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {PLANTED}",))


PLANTED = Path("/nonexistent")


def test_a_planted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    global PLANTED
    PLANTED = tmp_path / "PWNED"
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": Planted()}, tmp_path / "ckpt" / training.STATE_FILE)
    with pytest.raises(ValueError, match=r"cannot load training state .*ckpt/state\.pt"):
        training.checkpoint_state(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")))
    assert not PLANTED.exists()


def test_the_projects_own_training_state_loads_with_weights_only(tmp_path):
    model = create_model("bagnet9_small", num_classes=10)
    optimizer = make_optimizer(model, OptimConfig(), 64)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    stats = EpochStats(10)
    row = {"epoch": 0, **stats.summary("train"), "images_per_s": 1.5, "finished_at": time.time()}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "history": [row],
             "model_spec": ModelSpec("bagnet9_small", 10, {}, SYNTHETIC_CLASSES).to_dict()}
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / training.STATE_FILE)
    loaded = training.checkpoint_state(ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")))
    assert loaded["history"] == [row] and loaded["model_spec"]["classes"] == SYNTHETIC_CLASSES
    assert loaded["optimizer"]["state"]  # momentum buffers survive


# --------------------------------------------------------------------------------------------
# 3. content digests in fingerprints


def test_replaced_weights_change_the_fingerprint(tmp_path):
    w = weights_file(tmp_path / "w.pt", seed=0)
    cfg = experiment_cfg(tmp_path, f"models=[{{name: bagnet9_small, weights: {w}}}]")
    before = evaluation.make_plan(cfg, ["predictions"], None).parts[0].fingerprint
    weights_file(w, seed=1)  # same size, other bytes
    after = evaluation.make_plan(cfg, ["predictions"], None).parts[0].fingerprint
    assert before["model"]["weights_sha256"] != after["model"]["weights_sha256"]
    assert before["model"]["weights_sha256"] == storage.digest(str(w)) or after["model"]["weights_sha256"] == storage.digest(str(w))


def test_a_changed_imagenet_folder_changes_the_fingerprint(tmp_path):
    root = imagenet(tmp_path / "inet", ["n01", "n02"], ["n01", "n02"])
    cfg = experiment_cfg(tmp_path, "models=[{name: bagnet9_small}]", "data.dataset=imagenet", f"data.root={root}",
                         "split=val")
    before = evaluation.make_plan(cfg, ["predictions"], None).parts[0].fingerprint
    jpeg(root / "val" / "n01" / "added.JPEG")
    after = evaluation.make_plan(cfg, ["predictions"], None).parts[0].fingerprint
    assert before["images"] != after["images"]
    assert describe(cfg.data, "val").digest == after["images"]


# --------------------------------------------------------------------------------------------
# 4. the run lock


def _foreign_lease(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lease = {"host": "other-host", "pid": 1, "job": "train other", "token": "t", "expires_at": time.time() + 600,
             **fields}
    (folder / lock.LOCK_FILE).write_text(json.dumps(lease))
    return folder / lock.LOCK_FILE


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with lock.acquire(str(tmp_path / "run"), job="experiment A"):
        code = f"from store import lock; lock.acquire({str(tmp_path / 'run')!r}, job='experiment B')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode != 0 and "RunLocked" in out.stderr and "'experiment A'" in out.stderr
        assert f"pid {os.getpid()}" in out.stderr
    assert not (tmp_path / "run" / lock.LOCK_FILE).exists()  # released
    lock.acquire(str(tmp_path / "run"), job="experiment B").release()


def test_expired_and_dead_leases_are_taken_over(tmp_path):
    _foreign_lease(tmp_path / "a", expires_at=time.time() - 1)
    lock.acquire(str(tmp_path / "a"), job="x").release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_lease(tmp_path / "b", host=socket.gethostname(), pid=int(dead.stdout))
    lock.acquire(str(tmp_path / "b"), job="x").release()
    _foreign_lease(tmp_path / "c")
    with pytest.raises(lock.RunLocked, match=r"'train other' \(host other-host, pid 1\)"):
        lock.acquire(str(tmp_path / "c"), job="x")


def test_the_lease_is_renewed_while_held(tmp_path):
    lease = lock.acquire(str(tmp_path), job="x", ttl_s=0.4)
    first = json.loads((tmp_path / lock.LOCK_FILE).read_text())["expires_at"]
    time.sleep(0.5)
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["expires_at"] > first
    lease.release()


def test_s3_lease_is_exclusive(s3_bucket):
    folder = f"s3://{s3_bucket}/runs/r"
    with lock.acquire(folder, job="A", settle_s=0.1):
        with pytest.raises(lock.RunLocked, match="'A'"):
            lock.acquire(folder, job="B", settle_s=0.1)
    assert not storage.exists(f"{folder}/{lock.LOCK_FILE}")


def test_train_tune_and_experiment_jobs_refuse_a_held_run(tmp_path):
    _foreign_lease(tmp_path / "train" / "r")
    with pytest.raises(SystemExit, match=r"held by job 'train other'"):
        train_job.main([f"run.storage_path={tmp_path / 'train'}", "run.name=r"])
    _foreign_lease(tmp_path / "tune" / "s")
    with pytest.raises(SystemExit, match=r"held by job 'train other'"):
        tune_job.main([f"tune.storage_path={tmp_path / 'tune'}", "tune.name=s"])
    _foreign_lease(tmp_path / "exp" / "r")
    with pytest.raises(SystemExit, match=r"held by job 'train other'"):
        experiment_job.main(["--experiment", "predictions", "models=[{name: bagnet9_small}]",
                             f"output={tmp_path / 'exp'}", "run_id=r", "data.test_size=8"])


# --------------------------------------------------------------------------------------------
# 5. a resume with changed training settings


@pytest.mark.parametrize("change, key", [("optim.lr=0.001", "optim.lr"), ("optim.momentum=0", "optim.momentum"),
                                         ("run.seed=5", "run.seed"), ("optim.batch_size=8", "optim.batch_size")])
def test_resume_with_changed_training_settings_is_refused(tmp_path, change, key):
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(TrainJobConfig, None, ["optim.lr=0.4"])))
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .* before, .* now\); set run\.name"):
        training.check_rerun(load_config(TrainJobConfig, None, ["optim.lr=0.4", change]), str(tmp_path))


def test_compute_settings_and_more_epochs_may_change_on_resume(tmp_path):
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(TrainJobConfig, None, [])))
    cfg = load_config(TrainJobConfig, None, ["optim.epochs=20", "scaling.num_workers=4", "scaling.use_gpu=true",
                                             "data.read_batch_size=8", "run.log_every=5", "run.max_failures=-1"])
    assert training.check_rerun(cfg, str(tmp_path)) is False  # resumes


@pytest.mark.parametrize("text", ["[1, 2", "- a list\n"])
def test_a_corrupt_saved_config_is_named(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml: .*set run\.name to start a new run"):
        training.check_rerun(load_config(TrainJobConfig, None, []), str(tmp_path))


# --------------------------------------------------------------------------------------------
# 6. one rule for run names


@pytest.mark.parametrize("name", ["../escaped", "/abs/run", "a/b", "my run", "run é", "..", ".hidden", "_x", ""])
def test_unsafe_names_are_refused_naming_the_key(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run\.name: .* is not a safe folder name"):
        load_config(TrainJobConfig, None, [f"run.name={name!r}" if name else "run.name=''"])
    with pytest.raises(ConfigError, match=r"run_id: .* is not a safe folder name"):
        load_config(ExperimentJobConfig, None, ["models=[{name: bagnet9_small}]", f"run_id={name!r}"])
    with pytest.raises(ConfigError, match=r"tune\.name: .* is not a safe folder name"):
        sweep.load_sweep(ROOT / "configs" / "tune-synthetic.yaml", [f"tune.name={name!r}"])


def test_safe_names_pass():
    for name in ("run-1", "q17.aligned", "A_b"):
        assert load_config(TrainJobConfig, None, [f"run.name={name}"]).run.name == name


def test_a_default_name_from_the_file_stem_is_checked_too(tmp_path):
    cfg = load_config(TrainJobConfig, None, [])
    with pytest.raises(ConfigError, match=r"run\.name: 'my run'"):
        training.run_dir(cfg, "my run")


# --------------------------------------------------------------------------------------------
# 7. values that passed validation and failed later


@pytest.mark.parametrize("overrides, needle", [
    (["data.image_size=32"], r"data\.image_size: the synthetic world cannot draw 32px"),
    (["data.image_size=100000"], r"data\.image_size: must be in \[16, 2048\]"),
    (["model.name=bagnet33_small", "data.dataset=imagenet", "data.root=x", "data.image_size=20"],
     r"model\.name: bagnet33_small sees 33x33 px patches"),
    (["model.name=densenet_small", "data.dataset=imagenet", "data.root=x", "data.image_size=20"],
     r"model\.name: densenet_small cannot run on 20 px"),
    (["data.dataset=imagenet", "data.root=x", "data.resize=8"], r"data\.resize: must be >= image_size"),
    (["data.dataset=imagenet", "data.root=x", "data.limit=-1"], r"data\.limit: must be >= 1"),
    (["run.checkpoints_to_keep=0"], r"run\.checkpoints_to_keep: must be >= 1"),
    (["run.log_every=0"], r"run\.log_every: must be >= 1"),
    (["run.max_failures=-5"], r"run\.max_failures: must be >= 0 \(or -1"),
    (["optim.lr=.inf"], r"optim\.lr: expected a finite number"),
    (["optim.weight_decay=.nan"], r"optim\.weight_decay: expected a finite number"),
])
def test_values_that_used_to_fail_after_ray_started(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainJobConfig, None, overrides)


def test_max_failures_minus_one_means_unlimited():
    assert load_config(TrainJobConfig, None, ["run.max_failures=-1"]).run.max_failures == -1


def test_experiment_image_size_is_checked_for_every_model():
    with pytest.raises(ConfigError, match=r"models\[1\]\.name: bagnet33_small sees 33x33"):
        load_config(ExperimentJobConfig, None, ["models=[{name: bagnet9_small}, {name: bagnet33_small}]",
                                                "data.dataset=imagenet", "data.root=x", "data.image_size=24"])


@pytest.mark.parametrize("weights, needle", [
    ("no_such_weights_name", "cannot resolve weights 'no_such_weights_name'"),
    ("IMAGENET1K_V9", "cannot resolve weights 'IMAGENET1K_V9'"),
    ("release", "no released weights for model 'resnet_small'"),
])
def test_unresolvable_weight_names_are_refused_before_ray(weights, needle):
    with pytest.raises(ConfigError, match=rf"model\.weights: {needle}"):
        ModelConfig("resnet_small", weights).check_weights("model.weights")


def test_resolvable_weight_names_pass():
    ModelConfig("resnet50", "IMAGENET1K_V2").check_weights("w")
    ModelConfig("bagnet33", "release").check_weights("w")


def test_tilde_weights_are_found_by_train_and_experiments(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    weights_file(tmp_path / "b9.pt")
    model = ModelConfig("bagnet9_small", "~/b9.pt")
    model.check_weights("model.weights")
    model.check_classes("model.weights", SYNTHETIC_CLASSES)
    assert model.fingerprint()["weights_sha256"] == storage.digest(str(tmp_path / "b9.pt"))


def test_missing_s3_weights_and_bucket_are_refused(s3_bucket):
    with pytest.raises(ConfigError, match=rf"model\.weights: file not found: s3://{s3_bucket}/w/missing\.pt"):
        ModelConfig("bagnet9_small", f"s3://{s3_bucket}/w/missing.pt").check_weights("model.weights")
    with pytest.raises(ConfigError, match=r"output: bucket not found: s3://no-such-bucket-x"):
        check_output("s3://no-such-bucket-x/results", "output")
    check_output(f"s3://{s3_bucket}/results", "output")


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"output: .*/f is a file"):
        check_output(str(tmp_path / "f"), "output")
    check_output(str(tmp_path / "new"), "output")


def test_masking_needs_a_bagnet_heatmap_model(tmp_path):
    cfg = experiment_cfg(tmp_path, "models=[{name: bagnet9_small}, {name: resnet_small}]",
                         "experiments.masking.heatmap_model=resnet_small")
    with pytest.raises(ConfigError, match=r"experiments\.masking\.heatmap_model: 'resnet_small' is not a BagNet"):
        evaluation.make_plan(cfg, ["masking"], None)


# --------------------------------------------------------------------------------------------
# 8. files named, YAML quirks, NaN weights, durable renames


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim: {epochs: 3, batch_size: 8}\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML: duplicate key 'optim'"):
        load_config(TrainJobConfig, path)


def test_exponent_floats_are_numbers():
    assert load_config(TrainJobConfig, None, ["optim.lr=1e-3"]).optim.lr == 0.001
    assert parse_yaml("a: 1e9\nb: '1e-3'\nc: 1.5E-2") == {"a": 1e9, "b": "1e-3", "c": 0.015}


def test_a_zero_byte_weights_file_is_named(tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot load weights .*zero\.pt.*EOFError"):
        create_model("bagnet9_small", num_classes=10, weights=str(tmp_path / "zero.pt"))


def test_nan_weights_are_refused_on_load(tmp_path):
    state = create_model("bagnet9_small", num_classes=10).state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt hold NaN or infinite values .*'fc\.weight'"):
        create_model("bagnet9_small", num_classes=10, weights=str(tmp_path / "nan.pt"))


def test_local_atomic_writes_fsync_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    storage.write_text_atomic(str(tmp_path / "a" / "x.txt"), "hi")
    assert synced == [False, True]  # the file, then its folder (the rename)
