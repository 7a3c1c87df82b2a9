from pathlib import Path

import pytest

from bagnet.config import ConfigError, load_config, parse_overrides
from cluster.configs import CONFIG_DIR, TrainJobConfig
from cluster.sweep import load_sweep


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: bagnet9_small\noptim:\n  lr: 0.2\n")
    cfg = load_config(TrainJobConfig, path, ["optim.lr=0.05", "data.image_size=96", "optim.schedule=step",
                                             "model.options.aligned=true"])
    assert cfg.model.name == "bagnet9_small" and cfg.model.options == {"aligned": True}
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.image_size == 96 and cfg.optim.schedule == "step"


@pytest.mark.parametrize("override, needle", [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["bogus=1"], "bogus"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["model.name=resnet9000"], "resnet9000"),
    (["data.dataset=imagenet"], "data.root"),
    (["scaling.num_workers=0"], "scaling.num_workers"),
    (["optim.epochs=true"], "optim.epochs"),
    (["model.aligned=true"], "model.aligned"),  # the option lives under model.options now
    (["model.options.aligned=1"], "model.options.aligned"),
    (["model.options.algned=true"], "model.options.algned"),
    (["model.name=resnet_small", "model.options.aligned=true"], "model.options.aligned"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TrainJobConfig, None, override)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainJobConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainJobConfig, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  nme: x\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml.*model\.nme"):
        load_config(TrainJobConfig, wrong)


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


TRAIN_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name.startswith(("imagenet", "synthetic")))
TUNE_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("tune-*.yaml"))


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_train_configs_load(name):
    cfg = load_config(TrainJobConfig, CONFIG_DIR / name)
    assert cfg.model.name and cfg.optim.epochs >= 1


@pytest.mark.parametrize("name", TUNE_CONFIGS)
def test_shipped_tune_configs_load(name):
    sweep = load_sweep(CONFIG_DIR / name)
    assert sweep.param_space and sweep.name == Path(name).stem


def test_imagenet_configs_differ_only_in_the_model():
    """The three ImageNet recipes are one recipe: only the model (and the run named after it) differ."""
    texts = {q: (CONFIG_DIR / f"imagenet-bagnet{q}.yaml").read_text() for q in (9, 17, 33)}
    normalised = {text.replace(f"bagnet{q}", "bagnetQ").replace(f"BagNet-{q}", "BagNet-Q") for q, text in texts.items()}
    assert len(normalised) == 1
    assert TRAIN_CONFIGS and len(TUNE_CONFIGS) == 2
