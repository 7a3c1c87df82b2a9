"""What a training run shows: TensorBoard event files beside metrics.parquet (read back with
TensorBoard's own reader, local and on S3) and a console with one line per epoch, also with two
runs training at once."""

import re
import time

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from bagnet.config import load_config
from cluster import ray_env, training
from cluster.configs import TrainJobConfig
from jobs import reproduce, train
from store import storage


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 - e / 10, "val_loss": 2.1 - e / 10, "train_top1": 0.1 * e,
             "val_top1": 0.05 * e + 0.01, "train_top5": 0.5, "val_top5": 0.4 + e / 100, "lr": 0.1 / (e + 1),
             "images_per_s": 100.0 + e, "finished_at": 1.7e9 + e} for e in range(epochs)]


def read_events(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def assert_events_match(acc: EventAccumulator, rows: list[dict], lr: float) -> None:
    for tag, key in training.TENSORBOARD_SCALARS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["epoch"] + 1 for r in rows], tag  # step = epochs done
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == pytest.approx(lr)


def test_event_file_is_rewritten_from_the_history(tmp_path):
    run = tmp_path / "run"
    training.write_tensorboard(str(run), history(2), {"optim.lr": 0.4, "model.name": "bagnet9_small"})
    training.write_tensorboard(str(run), history(3), {"optim.lr": 0.4, "model.name": "bagnet9_small"})  # a resumed run
    assert [p.name for p in run.iterdir()] == [training.TENSORBOARD_FILE]
    assert_events_match(read_events(run), history(3), 0.4)  # each epoch once


def test_event_file_on_s3(s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/train/run"
    training.write_tensorboard(run, history(2), {"optim.lr": 0.2})
    local = tmp_path / "copy"
    local.mkdir()
    (local / training.TENSORBOARD_FILE).write_bytes(storage.read_bytes(storage.join(run, training.TENSORBOARD_FILE)))
    assert_events_match(read_events(local), history(2), 0.2)


def test_two_runs_at_once_write_events_and_one_console_line_per_epoch_each(ray_session, tmp_path, capfd, monkeypatch):
    """The reproduce run's train stage with ``train.concurrent_runs=2`` on the 2-CPU session: two
    one-worker runs (0.5 CPU each) and their data tasks (1 CPU) fit, so both train at once; each
    epoch line names its run and comes once."""
    spans, real_train = {}, train.train

    def timed(cfg, name):
        start = time.monotonic()
        try:
            return real_train(cfg, name)
        finally:
            spans[name] = (start, time.monotonic())

    monkeypatch.setattr(train, "train", timed)
    tiny = ["model.name=bagnet9_small", "data.train_size=64", "data.val_size=32", "optim.batch_size=32",
            "optim.epochs=2", "scaling.num_workers=1", "run.log_every=1000", f"run.storage_path={tmp_path}"]
    runs = {name: load_config(TrainJobConfig, train.DEFAULT_CONFIG, [*tiny, f"run.name={name}", f"run.seed={seed}"])
            for seed, name in enumerate(("tb0", "tb1"))}
    reproduce.train_all(runs, 2)
    assert max(start for start, _ in spans.values()) < min(end for _, end in spans.values())  # they overlapped
    console = capfd.readouterr()
    text = console.out + console.err
    for name in runs:
        epochs = re.findall(rf"\[train {name}\] epoch \d+/2 .*", text)
        assert [line.split()[3] for line in epochs] == ["1/2", "2/2"], text[-3000:]  # once each: no duplicated line
        metrics = pd.read_parquet(tmp_path / name / "metrics.parquet")
        assert_events_match(read_events(tmp_path / name), metrics.to_dict("records"), 0.4)  # synthetic.yaml's optim.lr
    assert "TrainingReport(" not in text and "Checkpoint successfully created" not in text
    assert "DeprecationWarning" not in text


@pytest.mark.parametrize("tty, forced, on", [(True, None, True), (False, None, False), (False, "1", True),
                                             (True, "0", False)])
def test_progress_bars_follow_the_terminal(monkeypatch, tty, forced, on):
    monkeypatch.setattr("sys.stdout.isatty", lambda: tty)
    if forced is None:
        monkeypatch.delenv(ray_env.PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_env.PROGRESS_ENV, forced)
    assert ray_env.progress_bars() is on
