"""The same config and seed give the same metrics on a rerun (ordered data, seeded shuffles and
init); the seed decides each worker's shuffle in each epoch."""

import pandas as pd
import pytest

from cluster import training
from tests.test_train import TINY, run

SEEDED = ["optim.epochs=2", "scaling.num_workers=2", "data.train_size=192", "data.val_size=64"]
COMPARED = ["train_loss", "train_top1", "val_loss", "val_top1", "val_top1_per_class"]


def metrics(tmp_path, name: str, seed: int) -> pd.DataFrame:
    return run(tmp_path, name, *TINY, *SEEDED, f"run.seed={seed}")["metrics"][COMPARED]


@pytest.mark.slow
def test_same_seed_same_metrics(ray_session, tmp_path):
    first, again = metrics(tmp_path, "a", 0), metrics(tmp_path, "b", 0)
    pd.testing.assert_frame_equal(first, again)  # exactly: same batches in the same order, same init


def test_shuffle_seed_differs_per_epoch_and_worker():
    seeds = {training.shuffle_seed(s, e, r) for s in range(3) for e in range(50) for r in range(8)}
    assert len(seeds) == 3 * 50 * 8
    assert training.ordered_ingest()._resolve_execution_options("train").preserve_order
