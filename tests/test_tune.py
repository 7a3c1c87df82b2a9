"""Ray Tune sweeps (cluster.sweep, jobs/tune.py): ASHA, the trial table, TensorBoard, resume, validation.

One small sweep (3 trials of bagnet9_small on the synthetic world, at most 2 epochs each) is run
once for the module, as `python jobs/tune.py` on the session's Ray instance: interrupted (SIGINT) as
soon as its second trial has reported an epoch, then resumed by running the same command again.
The tests check its outputs; validation tests need no Ray.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bagnet.config import ConfigError, load_config
from bagnet.models import create_model
from cluster import sweep as sweeps
from cluster import training
from cluster.configs import TrainJobConfig
from jobs import tune
from store.schemas import TUNE_SCHEMA, read_tune_metadata
from tests.cluster_utils import second_driver_env

ROOT = Path(__file__).resolve().parents[1]
LRS = [0.4, 1e-5, 0.3]  # two learn, one barely moves: ASHA stops it at the first rung
TRAIN = {"model": {"name": "bagnet9_small"}, "data": {"train_size": 512, "val_size": 128},
         "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0},
         "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "run": {"max_failures": 0, "log_every": 1000}}


def write_sweep(tmp_path: Path, search_space: dict, **tune_cfg) -> Path:
    cfg = {"base": str(ROOT / "configs" / "synthetic.yaml"), "train": TRAIN, "search_space": search_space,
           "tune": {"storage_path": str(tmp_path / "results"), "max_concurrent_trials": 1, "verbose": 0,
                    "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, **tune_cfg}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def result_lines(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.glob("run_trial_*") if p.is_dir())


def start_cli(config: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(config)], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    """Run the sweep, interrupt it (SIGINT) once trial 2 reports, run the same command again."""
    tmp = tmp_path_factory.mktemp("tune")
    config = write_sweep(tmp, {"optim.lr": {"grid": LRS}})
    sweep_dir, env = tmp / "results" / "sweep", second_driver_env(ray_session)
    first = start_cli(config, env, tmp / "interrupted.log")
    deadline = time.monotonic() + 1200
    while sum(bool(result_lines(d)) for d in trial_dirs(sweep_dir)) < 2:
        assert time.monotonic() < deadline and first.poll() is None, (tmp / "interrupted.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)
    try:
        first.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {d.name: d.joinpath("result.json").read_bytes() for d in trial_dirs(sweep_dir) if result_lines(d)}
    second = start_cli(config, env, tmp / "resumed.log")
    try:
        second.wait(timeout=900)
    except subprocess.TimeoutExpired:
        held = ray_session.available_resources(), ray_session.util.placement_group_table()
        os.killpg(second.pid, signal.SIGKILL)
        pytest.fail(f"the resumed sweep did not end in 900 s; available {held[0]}; placement groups "
                    f"{[(g['state'], g['bundles']) for g in held[1].values()]}\n"
                    f"{(tmp / 'resumed.log').read_text()[-3000:]}")
    assert second.returncode == 0, (tmp / "resumed.log").read_text()[-3000:]
    best_dir = sweep_dir / "best"
    return {"dir": sweep_dir, "before": before, "returncode": first.returncode, "config": config,
            "log": (tmp / "interrupted.log").read_text(errors="replace"),
            "resumed_log": (tmp / "resumed.log").read_text(errors="replace"),
            "table": pd.read_parquet(sweep_dir / "tune_trials.parquet"),
            "best": json.loads((best_dir / "trial.json").read_text()), "best_dir": best_dir}


@pytest.mark.slow  # the shared sweep: 3-4 Ray Train runs (see the marker in pyproject.toml)
def test_interrupted_sweep_resumes_without_repeating_trials(sweep):
    assert sweep["returncode"] == 130, sweep["log"][-3000:]
    assert "sweep interrupted" in sweep["log"]
    dirs = {d.name: d for d in trial_dirs(sweep["dir"])}
    assert len(sweep["before"]) == 2 and len(dirs) == len(LRS) and set(sweep["before"]) < set(dirs)
    # trials run one at a time: the first was over when the second reported, and is not run again
    first = sorted(sweep["before"])[0]
    assert dirs[first].joinpath("result.json").read_bytes() == sweep["before"][first]
    for name, trial_dir in dirs.items():  # the second one went on where it stopped, if ASHA had not stopped it
        epochs = [line["epoch"] for line in result_lines(trial_dir)]
        assert epochs == list(range(len(epochs))) and epochs, (name, epochs)  # no epoch reported twice
    assert "resuming sweep" in sweep["resumed_log"]
    table = sweep["table"]
    assert len(table) == len(LRS) and table["trial_id"].is_unique
    for row in table.itertuples():  # each Train run (an interrupted one resumed from its checkpoint) has each epoch once
        metrics = pd.read_parquet(Path(row.train_run) / "metrics.parquet")
        assert list(metrics["epoch"]) == list(range(row.epochs)), row.trial_id


@pytest.mark.slow  # the shared sweep: 3-4 Ray Train runs (see the marker in pyproject.toml)
def test_asha_stops_weak_trials_and_table_holds_every_trial(sweep):
    table = sweep["table"]
    assert len(table) == len(LRS) and set(table["status"]) == {"TERMINATED"}
    assert sorted(table["optim_lr"]) == sorted(LRS)
    schema = pq.read_schema(sweep["dir"] / "tune_trials.parquet")
    assert schema.names == [*TUNE_SCHEMA.names, "optim_lr"]
    assert read_tune_metadata(schema) == (["optim_lr"], {"metric": "val_top1", "mode": "max"})
    assert set(table["model"]) == {"bagnet9_small"} and set(table["q"]) == {9}
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 1, table[["optim_lr", "epochs", "val_top1_last"]]
    assert (stopped["epochs"] < 2).all() and (table["max_epochs"] == 2).all()
    assert (table.loc[~table["stopped_early"], "epochs"] == 2).all()
    assert (table["val_top1_best"] >= table["val_top1_last"]).all()
    for path in table["checkpoint_path"]:
        assert (Path(path) / "state.pt").is_file()
    summary = sweep["resumed_log"].split("trials by val_top1 (max):")[1].split("accuracy by patch size q:")
    printed = [line.split()[0] for line in summary[0].strip().splitlines()[1:]]
    assert printed == list(table.sort_values("val_top1_last", ascending=False)["trial_id"])
    by_q = summary[1].strip().splitlines()
    assert by_q[1].split()[:4] == ["9", "bagnet9_small", str(len(LRS)), str(int(table["stopped_early"].sum()))]


@pytest.mark.slow  # the shared sweep: 3-4 Ray Train runs (see the marker in pyproject.toml)
def test_tensorboard_events_hold_metrics_and_hyperparameters(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    table = sweep["table"].set_index("trial_id")
    for trial_dir in trial_dirs(sweep["dir"]):
        trial_id = result_lines(trial_dir)[-1]["trial_id"]
        acc = EventAccumulator(str(trial_dir))
        acc.Reload()
        events = acc.Scalars("ray/tune/val_top1")
        epochs = int(table.loc[trial_id, "epochs"])
        assert [e.step for e in events] == list(range(1, epochs + 1))  # the step is the epoch
        assert events[-1].value == pytest.approx(table.loc[trial_id, "val_top1_last"])
        assert "ray/tune/train_loss" in acc.Tags()["scalars"]
        hparams = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["optim.lr"].number_value == pytest.approx(table.loc[trial_id, "optim_lr"])


@pytest.mark.slow  # the shared sweep: 3-4 Ray Train runs (see the marker in pyproject.toml)
def test_best_model_is_exported_like_a_training_run(sweep):
    table = sweep["table"]
    best = table.loc[table["val_top1_last"].idxmax()]
    assert sweep["best"]["trial_id"] == best["trial_id"]
    cfg = load_config(TrainJobConfig, sweep["best_dir"] / "config.yaml")
    assert cfg.optim.lr == pytest.approx(best["optim_lr"]) and cfg.model.name == "bagnet9_small"
    model = create_model(cfg.model.name, weights=str(sweep["best_dir"] / "model.pt"))  # its spec: 10 classes
    assert model.model_spec.num_classes == 10
    state = torch.load(Path(best["checkpoint_path"]) / "state.pt", weights_only=False)["model"]
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


@pytest.mark.slow  # the shared sweep: 3-4 Ray Train runs (see the marker in pyproject.toml)
def test_changed_sweep_does_not_resume(sweep):
    with pytest.raises(ConfigError, match=r"search_space\.optim\.lr\.grid: \[0\.4, .* before, \[0\.1, 0\.2\] now.*set tune\.name"):
        sweeps.check_resumable(sweeps.load_sweep(sweep["config"], ["search_space.optim.lr={grid: [0.1, 0.2]}"]))


def test_an_ended_trials_placement_group_is_freed(ray_session, tmp_path):
    """A Train run's group left held (its controller ended from outside) is removed once the trial
    has been over for the grace time; a group already removed, or none recorded, is left alone."""
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": 0.1}])
    ray_session.get(group.ready(), timeout=60)
    sweep_dir = tmp_path / "sweep"
    run_dir = Path(sweeps.train_root(str(sweep_dir))) / "t1"
    run_dir.mkdir(parents=True)
    (run_dir / training.PLACEMENT_GROUP_FILE).write_text(group.id.hex())
    callback = sweeps.FreeEndedTrials(str(sweep_dir), grace_s=0.5)
    for trial_id in ("t1", "t2"):  # t2 recorded no group
        callback.on_trial_complete(0, [], SimpleNamespace(trial_id=trial_id))
    callback.on_step_begin(0, [])  # within the grace time: nothing happens
    assert ray_session.util.placement_group_table(group)["state"] == "CREATED" and len(callback.ended) == 2
    time.sleep(0.6)
    callback.on_step_begin(0, [])
    assert ray_session.util.placement_group_table(group)["state"] == "REMOVED" and not callback.ended
    assert not training.release_placement_group(str(run_dir))  # already removed


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"grid": [0.1]}}, "search_space.optim.lrr: unknown parameter (known keys under optim:"),
    ({"optim.lr": {"grid": []}}, "search_space.optim.lr: grid needs a non-empty list"),
    ({"optim.lr": {"grid": [0.1, -0.5]}}, "search_space.optim.lr: value -0.5 is invalid: optim.lr: must be > 0"),
    ({"optim.lr": {"uniform": [-0.1, 0.5]}}, "search_space.optim.lr: value -0.1 is invalid: optim.lr: must be > 0"),
    ({"optim.lr": {"loguniform": [0, 1]}}, "search_space.optim.lr: loguniform needs low > 0"),
    ({"optim.lr": {"loguniform": [0.5, 0.1]}}, "search_space.optim.lr: loguniform needs low < high"),
    ({"optim.lr": {"normal": [0, 1]}}, "search_space.optim.lr: unknown distribution 'normal'"),
    ({"optim.lr": 0.1}, "search_space.optim.lr: expected one of {grid: [...]}"),
    ({"model.name": {"choice": ["bagnet9_small", "bagnet99"]}}, "search_space.model.name: value 'bagnet99' is invalid"),
    ({"data.train_size": {"uniform": [100, 200]}}, "search_space.data.train_size: value 100.0 is invalid"),
    ({"data.train_size": {"randint": [0, 10]}}, "search_space.data.train_size: value 0 is invalid"),
    ({"optim": {"grid": [1]}}, "search_space.optim: is a config section"),
    ({"optim.epochs": {"grid": [1, 2]}}, "search_space.optim.epochs: cannot be swept"),
    ({"model.options.aligned": {"grid": [True, "yes"]}}, "search_space.model.options.aligned: value 'yes' is invalid"),
    ({"model.options.algned": {"grid": [True]}}, "model 'bagnet9_small' has no option 'algned'"),
])
def test_bad_search_space_fails_before_any_trial(tmp_path, space, message):
    config = write_sweep(tmp_path, space)
    with pytest.raises(SystemExit, match=re.escape(message)):
        tune.main(["--config", str(config)])
    assert not (tmp_path / "results").exists()


def test_search_space_overrides_and_param_space():
    sweep = sweeps.load_sweep(ROOT / "configs" / "tune-synthetic.yaml",
                            ["search_space.optim.weight_decay={loguniform: [1.0e-5, 1.0e-3]}", "tune.num_samples=2"])
    assert set(sweep.param_space) == {"model.name", "optim.lr", "optim.weight_decay"}
    assert sweep.param_space["model.name"] == {"grid_search": ["bagnet9_small", "bagnet17_small", "bagnet33_small"]}
    assert sweep.param_space["optim.weight_decay"].lower == pytest.approx(1e-5)
    assert sweep.config.tune.num_samples == 2 and sweep.name == "tune-synthetic"
    cfg = sweeps.trial_config(sweep.base, {"model.name": "bagnet17_small", "optim.lr": 0.2})
    assert (cfg.model.name, cfg.optim.lr, cfg.scaling.num_workers) == ("bagnet17_small", 0.2, 1)
    aligned = sweeps.trial_config(sweep.base, {"model.options.aligned": True})
    assert aligned.model.options == {"aligned": True}
    imagenet = sweeps.load_sweep(ROOT / "configs" / "tune-imagenet.yaml")
    assert imagenet.param_space["model.name"] == {"grid_search": ["bagnet9", "bagnet17", "bagnet33"]}


def test_trial_table_declares_its_parameter_columns(tmp_path):
    config = write_sweep(tmp_path, {"optim.lr": {"grid": [0.1, 0.2]}, "model.options.aligned": {"grid": [False, True]}},
                         metric="val_loss", mode="min")
    sweep = sweeps.load_sweep(config)
    fixed = {name: None for name in TUNE_SCHEMA.names}
    rows = [{**fixed, "trial_id": f"t{i}", "epochs": 2, "q": 9, "stopped_early": False, "optim_lr": lr,
             "model_options_aligned": aligned} for i, (lr, aligned) in enumerate([(0.1, False), (0.2, True)])]
    table = sweeps.trial_table(sweep, rows)
    params = ["model_options_aligned", "optim_lr"]  # in the config's order (write_sweep sorts the keys)
    assert table.schema.names == [*TUNE_SCHEMA.names, *params]
    assert str(table.schema.field("optim_lr").type) == "double" and str(table.schema.field("q").type) == "int64"
    assert str(table.schema.field("model_options_aligned").type) == "bool"
    assert read_tune_metadata(table.schema) == (params, {"metric": "val_loss", "mode": "min"})
