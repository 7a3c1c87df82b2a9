import pytest

from bagnet.config import ConfigError, load_config, parse_overrides
from jobs.train import TrainJobConfig


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: bagnet9_small\noptim:\n  lr: 0.2\n")
    cfg = load_config(TrainJobConfig, path, ["optim.lr=0.05", "data.image_size=32", "optim.schedule=step"])
    assert cfg.model.name == "bagnet9_small"
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.image_size == 32 and cfg.optim.schedule == "step"


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


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        if path.name.startswith(("imagenet", "synthetic")):
            load_config(TrainJobConfig, path)
