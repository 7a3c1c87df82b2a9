"""Ray Train end to end on the synthetic world: learning, export with the model's spec, resume,
worker failure, runs too large to train at once, and the rerun check (the last without Ray)."""

import pandas as pd
import pytest
import torch

from bagnet.config import ConfigError, dump_yaml, load_config, updated
from bagnet.models import create_model
from cluster import training
from cluster.configs import TrainJobConfig
from jobs import reproduce, train

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
    saved = torch.load(out["model"], weights_only=True)
    assert saved["model_spec"]["num_classes"] == 10 and len(saved["model_spec"]["classes"]) == 10
    model = create_model("bagnet9_small", weights=out["model"])  # the number of classes comes from the spec
    assert torch.equal(model.state_dict()["fc.weight"], saved["state_dict"]["fc.weight"])
    assert run(tmp_path, "learn", *learn)["skipped"]
    assert run(tmp_path, "learn", *learn, "data.read_batch_size=16", "scaling.cpus_per_worker=0.25")["skipped"]  # compute only
    with pytest.raises(SystemExit, match=r"data\.image_size: 64 before, 96 now\); set run\.name"):
        run(tmp_path, "learn", *learn, "data.image_size=96")
    with pytest.raises(SystemExit, match=r"model\.options\.aligned"):
        run(tmp_path, "learn", *learn, "model.options.aligned=true")


def test_aligned_model_exports_its_spec(ray_session, tmp_path):
    out = run(tmp_path, "aligned", "model.name=bagnet17_small", "model.options.aligned=true", "data.train_size=64",
              "data.val_size=32", "optim.batch_size=32", "optim.epochs=1", "scaling.num_workers=1", "run.log_every=1000")
    spec = torch.load(out["model"], weights_only=True)["model_spec"]
    assert spec["name"] == "bagnet17_small" and spec["options"] == {"aligned": True}
    model = create_model("bagnet17_small", weights=out["model"])
    assert model.aligned and model.offset < 0 and model.model_spec.options == {"aligned": True}
    with pytest.raises(ValueError, match="aligned"):
        create_model("bagnet17_small", weights=out["model"], aligned=False)


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates(ray_session, tmp_path):
    with pytest.raises(Exception):
        run(tmp_path, "resume", *TINY, "scaling.num_workers=1", "run.max_failures=0", "run.crash_after_epoch=1")
    partial = pd.read_parquet(tmp_path / "resume" / "metrics.parquet")
    assert list(partial["epoch"]) == [0, 1] and not (tmp_path / "resume" / "model.pt").exists()
    out = run(tmp_path, "resume", *TINY, "scaling.num_workers=1", "run.max_failures=0")
    assert list(out["metrics"]["epoch"]) == [0, 1, 2]
    # epochs 0 and 1 come from the checkpoint, not from training them again
    assert list(out["metrics"]["finished_at"])[:2] == list(partial["finished_at"])


def test_missing_imagenet_root_fails_before_ray(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path / "nope")):
        train.main(["--config", str(train.DEFAULT_CONFIG), "data.dataset=imagenet", f"data.root={tmp_path / 'nope'}"])


def test_rerun_check_compares_the_fingerprint(tmp_path):
    cfg = load_config(TrainJobConfig, train.DEFAULT_CONFIG, ["model.options.aligned=true"])
    assert not training.check_rerun(cfg, str(tmp_path))  # nothing there yet
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    same = load_config(TrainJobConfig, train.DEFAULT_CONFIG,
                       ["model.options.aligned=true", "data.num_cpus=2", "data.test_size=8", "optim.epochs=20"])
    assert not training.check_rerun(same, str(tmp_path))  # same run, not finished (no model.pt)
    other = load_config(TrainJobConfig, train.DEFAULT_CONFIG, ["model.options.aligned=false"])
    with pytest.raises(ConfigError, match=r"model\.options\.aligned: True before, False now\); set run\.name"):
        training.check_rerun(other, str(tmp_path))


def test_kind_accuracy_groups_synthetic_classes():
    cfg = load_config(TrainJobConfig, train.DEFAULT_CONFIG)
    kinds = cfg.data.world().class_kinds()
    per_class = [1.0 if kind == "local motifs" else 0.0 for kind in kinds]
    by_kind = cfg.data.world().kind_accuracy(per_class)
    assert by_kind["local motifs"] == 1.0 and set(by_kind) == set(kinds)
    assert all(acc == 0.0 for kind, acc in by_kind.items() if kind != "local motifs")


def test_runs_that_cannot_fit_together_are_refused_naming_the_key(ray_session):
    """Two runs of two 0.5-CPU workers hold both CPUs of the session: their data tasks could never
    start, so the stage is refused before it trains, with the numbers."""
    two_workers = load_config(TrainJobConfig, train.DEFAULT_CONFIG, ["scaling.num_workers=2"])
    with pytest.raises(ConfigError, match=r"train\.concurrent_runs: 2 training runs at once need 3 CPUs \(2 x 1 for "
                                          r"the workers .*plus 1 for the data tasks .*the cluster has 2\."):
        training.check_runs_fit(two_workers, 2, "train.concurrent_runs")
    training.check_runs_fit(two_workers, 1, "train.concurrent_runs")
    training.check_runs_fit(updated(two_workers, {"scaling": {"num_workers": 1}}), 2, "train.concurrent_runs")
    with pytest.raises(SystemExit, match=r"train\.concurrent_runs: 2 training runs at once need 3 CPUs"):
        reproduce.train_all({"a": two_workers, "b": two_workers}, 2)
