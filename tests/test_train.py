"""Ray Train end to end on the synthetic world: learning, export, resume, worker failure."""

import pandas as pd
import pytest
import torch

from bagnet.models import create_model
from jobs import train

TINY = ["model.name=bagnet9_small", "data.train_size=256", "data.val_size=128",
        "optim.batch_size=32", "optim.epochs=3", "run.log_every=1000"]


def run(tmp_path, name, *extra):
    return train.main(["--config", str(train.DEFAULT_CONFIG), f"run.storage_path={tmp_path}", f"run.name={name}", *extra])


def test_two_workers_learn_and_export(ray_session, tmp_path):
    learn = ["data.train_size=1536", "data.val_size=512", "optim.epochs=3", "model.name=bagnet9_small",
             "scaling.num_workers=2"]
    out = run(tmp_path, "learn", *learn)
    metrics = out["metrics"]
    assert list(metrics["epoch"]) == [0, 1, 2]
    assert (metrics["world_size"] == 2).all()
    # 10 classes: chance is 0.1; the local-motif classes alone are 40% of the data
    assert metrics["val_top1"].iloc[-1] > 0.3, metrics[["epoch", "train_top1", "val_top1"]]
    assert metrics["val_count"].iloc[-1] == 512
    state = torch.load(out["model"], weights_only=True)
    model = create_model("bagnet9_small", num_classes=10, weights=out["model"])
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert run(tmp_path, "learn", *learn)["skipped"]
    with pytest.raises(SystemExit, match="data.image_size"):
        run(tmp_path, "learn", *learn, "data.image_size=96")


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates(ray_session, tmp_path):
    with pytest.raises(Exception):
        run(tmp_path, "resume", *TINY, "scaling.num_workers=1", "run.max_failures=0", "run.crash_after_epoch=1")
    partial = pd.read_parquet(tmp_path / "resume" / "metrics.parquet")
    assert list(partial["epoch"]) == [0, 1]
    out = run(tmp_path, "resume", *TINY, "scaling.num_workers=1", "run.max_failures=0")
    assert list(out["metrics"]["epoch"]) == [0, 1, 2]
    # epochs 0 and 1 come from the checkpoint, not from training them again
    assert list(out["metrics"]["finished_at"])[:2] == list(partial["finished_at"])


def test_missing_imagenet_root_fails_before_ray(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path / "nope")):
        train.main(["--config", str(train.DEFAULT_CONFIG), "data.dataset=imagenet", f"data.root={tmp_path / 'nope'}"])
