"""Jobs end with a non-zero exit status on any failure, so `ray job submit` reports FAILED: a sweep
with an errored trial (and its table is not published as complete), an experiment run and a
reproduce run; a crashed training run raises out of ``train.main`` (exit status 1, see
``exit_status``), tested by tests/test_train.py's interrupted run. Failures come from the project's
fault hooks: ``run.crash_after_epoch`` (a Train worker dies) and an experiment whose rows break its
schema."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster import sweep as sweeps
from jobs import experiment, reproduce, tune
from store import lock
from store.schemas import TUNE_FILE
from tests.test_experiment_runner import dummy_module  # noqa: F401 - the fixture: an experiment outside the package

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=bagnet9_small", "data.train_size=64", "data.val_size=32", "optim.batch_size=32",
        "optim.epochs=2", "scaling.num_workers=1", "run.log_every=1000"]


def exit_status(main, argv: list[str]) -> tuple[int, str]:
    """The status `python jobs/<job>.py argv` exits with (how the interpreter maps ``main()``'s
    outcome: SystemExit's code, 1 for a message or any other exception), and the error."""
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
        return (code if isinstance(code, int) else 0 if code is None else 1), str(code)
    except Exception as exc:  # noqa: BLE001 - an uncaught exception ends the interpreter with 1
        return 1, f"{type(exc).__name__}: {exc}"
    return 0, ""


def test_exit_status_follows_the_interpreter():
    def fails():
        raise RuntimeError("boom")
    assert exit_status(lambda argv: None, []) == (0, "")
    assert exit_status(lambda argv: fails(), [])[0] == 1
    assert exit_status(lambda argv: (_ for _ in ()).throw(SystemExit("error: x")), []) == (1, "error: x")


@pytest.mark.slow  # one Tune trial whose Train worker dies
def test_sweep_with_an_errored_trial_fails_and_publishes_no_table(ray_session, tmp_path):
    nested = {"model": {"name": "bagnet9_small"}, "data": {"train_size": 64, "val_size": 32},
              "optim": {"epochs": 2, "batch_size": 32}, "scaling": {"num_workers": 1},
              "run": {"log_every": 1000, "crash_after_epoch": 0, "max_failures": 0}}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "synthetic.yaml"), "train": nested,
        "search_space": {"optim.lr": {"grid": [0.4]}},
        "tune": {"storage_path": str(tmp_path / "tune"), "verbose": 0, "scheduler": {"kind": "fifo"}}}))
    status, error = exit_status(tune.main, ["--config", str(config)])
    assert status == 1 and "1 of 1 trial(s) failed" in error and "run the same command again" in error, error
    sweep_dir = tmp_path / "tune" / "sweep"
    assert not (sweep_dir / TUNE_FILE).exists() and not (sweep_dir / "best").exists()
    incomplete = pd.read_parquet(sweep_dir / sweeps.INCOMPLETE_FILE)
    assert list(incomplete["status"]) == ["ERROR"] and incomplete["error"].iloc[0]


def test_failed_experiment_part_exits_non_zero(ray_session, tmp_path, dummy_module):  # noqa: F811
    status, error = exit_status(experiment.main, [
        "--experiment", dummy_module, "--config", str(experiment.DEFAULT_CONFIG), f"output={tmp_path}",
        "run_id=broken", "data.test_size=8", "compute.batch_size=8", "models=[{name: bagnet9_small}]",
        f"modules=[{dummy_module}]", f"experiments.{dummy_module}.broken=type"])
    assert status != 0 and "bucket" in error, error
    assert not (tmp_path / "broken" / "_SUCCESS").exists()


def test_failed_reproduce_stage_exits_non_zero(tmp_path):
    """The train stage fails at run time (another job holds its run's lock): the run stops there."""
    overrides = "[" + ", ".join(o for o in TINY if not o.startswith("model.name")) + "]"
    with lock.acquire(str(tmp_path / "train" / "bagnet9_small"), job="another train job"):
        status, error = exit_status(reproduce.main, [
            "train.models=[bagnet9_small]", "train.seeds=[0]", f"train.storage_path={tmp_path / 'train'}",
            f"train.overrides={overrides}", f"experiments.overrides=[output={tmp_path / 'experiments'}]",
            f"report.out={tmp_path / 'report'}"])
    assert status != 0 and "another train job" in error, error
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "report").exists()
