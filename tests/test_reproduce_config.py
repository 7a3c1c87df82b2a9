"""The reproduce run's stages as configs (no Ray): one training run per model and seed, and the
experiments once per seed on that seed's models."""

import pytest

from bagnet.config import ConfigError, load_config
from cluster.configs import ReproduceConfig
from jobs import reproduce


def config(*overrides: str) -> ReproduceConfig:
    return load_config(ReproduceConfig, reproduce.DEFAULT_CONFIG, list(overrides))


def test_three_seeds_per_model_each_its_own_run():
    cfg = config("train.models=[bagnet9_small,resnet_small]")
    runs = reproduce.train_configs(cfg)
    assert list(runs) == [f"{m}-seed{s}" for m in ("bagnet9_small", "resnet_small") for s in (0, 1, 2)]
    assert [r.run.seed for r in runs.values()] == [0, 1, 2, 0, 1, 2]
    assert runs["resnet_small-seed2"].model.name == "resnet_small"
    exps = reproduce.experiment_configs(cfg)
    assert [e.run_id for e in exps] == [f"experiments-synthetic-seed{s}" for s in (0, 1, 2)]
    weights = {m.name: m.weights for m in exps[1].models}
    assert weights["bagnet9_small"] == "results/train/bagnet9_small-seed1/model.pt"
    assert weights["resnet_small"] == "results/train/resnet_small-seed1/model.pt"


def test_one_seed_keeps_the_plain_names():
    cfg = config("train.models=[bagnet9_small]", "train.seeds=[0]")
    assert list(reproduce.train_configs(cfg)) == ["bagnet9_small"]
    (exp,) = reproduce.experiment_configs(cfg)
    assert exp.run_id == "experiments-synthetic"
    assert {m.name: m.weights for m in exp.models}["bagnet9_small"] == "results/train/bagnet9_small/model.pt"
    with pytest.raises(ConfigError, match=r"seeds"):
        config("train.seeds=[1,1]")
