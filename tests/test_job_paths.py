"""Where jobs write, checked before Ray starts (cluster.paths): the results root BAGNET_RESULTS, the
refusal of relative output paths on a cluster, the placeholder bucket, and `--print-config`."""

import re

import pytest
import ray
import yaml

from bagnet.config import load_config
from cluster import paths
from cluster.configs import CONFIG_DIR, ExperimentJobConfig, TrainJobConfig
from jobs import experiment, reproduce, train, tune

JOBS = {  # job -> (module, extra arguments naming its config)
    "train": (train, []),
    "tune": (tune, []),
    "experiment": (experiment, ["--experiment", "all"]),
    "reproduce": (reproduce, []),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test; no cluster or results root is set."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for name in (*paths.JOB_ENV, paths.RESULTS_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_relative_paths_go_under_the_results_root(no_ray, tmp_path):
    no_ray.setenv(paths.RESULTS_ENV, "s3://our-bucket/bagnet/")
    cfg = paths.job_paths(load_config(TrainJobConfig, CONFIG_DIR / "imagenet-bagnet33.yaml",
                                      ["model.weights=init/bagnet33.pt"]))
    assert cfg.run.storage_path == "s3://our-bucket/bagnet/train"
    assert cfg.data.root == "s3://our-bucket/bagnet/imagenet"
    assert cfg.model.weights == "s3://our-bucket/bagnet/init/bagnet33.pt"
    absolute = paths.job_paths(load_config(TrainJobConfig, None, [f"run.storage_path={tmp_path}",
                                                                  "model.weights=release"]))
    assert absolute.run.storage_path == str(tmp_path) and absolute.model.weights == "release"  # used as given
    exp = paths.job_paths(load_config(ExperimentJobConfig, CONFIG_DIR / "experiments-synthetic.yaml"))
    assert exp.output == "s3://our-bucket/bagnet/results/experiments"
    assert exp.models[0].weights == "s3://our-bucket/bagnet/results/train/bagnet9_small/model.pt"
    no_ray.setenv(paths.RESULTS_ENV, str(tmp_path))  # a shared file system (on-premise NFS)
    local = paths.job_paths(load_config(TrainJobConfig, None))
    assert local.run.storage_path == str(tmp_path / "results" / "train")


def test_without_a_root_relative_paths_stay_local(no_ray):
    cfg = paths.job_paths(load_config(TrainJobConfig, None))
    assert cfg.run.storage_path == "results/train"


@pytest.mark.parametrize("job, key", [("train", "run.storage_path"), ("tune", "tune.storage_path"),
                                      ("experiment", "output"), ("reproduce", "train.storage_path")])
@pytest.mark.parametrize("variable, value", [("RAY_ADDRESS", "10.0.0.1:6379"), ("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")])
def test_relative_output_on_a_cluster_is_refused_before_ray(no_ray, capsys, job, key, variable, value):
    no_ray.setenv(variable, value)
    module, extra = JOBS[job]
    with pytest.raises(SystemExit) as exc:
        module.main(extra)
    message = str(exc.value.code)
    assert re.search(rf"{re.escape(key)}: relative path .* on a cluster", message), message
    assert paths.RESULTS_ENV in message and "s3://" in message


def test_a_relative_results_root_is_refused_on_a_cluster(no_ray):
    no_ray.setenv(paths.RESULTS_ENV, "results")  # e.g. forwarded from a laptop's shell
    assert paths.rooted("train", "run.storage_path") == "results/train"
    no_ray.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(SystemExit, match=r"run\.storage_path: relative path 'results/train' on a cluster"):
        train.main([])


@pytest.mark.parametrize("job, override, key", [
    ("train", "run.storage_path=s3://YOUR-BUCKET/bagnet/train", "run.storage_path"),
    ("train", "model.weights=s3://YOUR-BUCKET/w.pt", "model.weights"),
    ("tune", "tune.storage_path=s3://YOUR-BUCKET/tune", "tune.storage_path"),
    ("tune", "train.data.root=s3://YOUR-BUCKET/imagenet", "train.data.root"),
    ("experiment", "output=s3://YOUR-BUCKET/experiments", "output"),
    ("reproduce", "train.overrides=[data.root=s3://YOUR-BUCKET/imagenet]", "train.overrides[0]"),
    ("reproduce", "report.out=s3://YOUR-BUCKET/report", "report.out"),
])
def test_placeholder_bucket_is_refused_naming_the_key(no_ray, job, override, key):
    module, extra = JOBS[job]
    with pytest.raises(SystemExit, match=rf"{re.escape(key)}: '[^']*s3://YOUR-BUCKET/[^']*' holds the placeholder bucket"):
        module.main([*extra, override])


def test_placeholder_results_root_is_refused(no_ray):
    no_ray.setenv(paths.RESULTS_ENV, "s3://YOUR-BUCKET/bagnet")
    with pytest.raises(SystemExit, match=r"BAGNET_RESULTS=s3://YOUR-BUCKET/bagnet holds the placeholder bucket"):
        train.main([])


def test_no_config_names_a_bucket():
    """Configs hold relative paths (under BAGNET_RESULTS): the cluster files name the bucket, once."""
    def values(node):
        if isinstance(node, dict):
            return [v for x in node.values() for v in values(x)]
        return [v for x in node for v in values(x)] if isinstance(node, list) else [node]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        named = [v for v in values(yaml.safe_load(path.read_text())) if isinstance(v, str) and "s3://" in v]
        assert not named, (path.name, named)
        paths.check_placeholder(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("job", JOBS)
def test_print_config_prints_the_resolved_yaml_without_ray(no_ray, capsys, job):
    no_ray.setenv(paths.RESULTS_ENV, "s3://our-bucket/bagnet")
    module, extra = JOBS[job]
    module.main([*extra, "--print-config"])
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs and all(isinstance(d, dict) for d in docs)
    first = docs[0]
    rooted = {"train": lambda d: d["run"]["storage_path"], "tune": lambda d: d["tune"]["storage_path"],
              "experiment": lambda d: d["output"], "reproduce": lambda d: d["train"]["storage_path"]}[job](first)
    assert rooted.startswith("s3://our-bucket/bagnet/results/")
    if job == "reproduce":  # then each training run's config (per model and seed) and each seed's experiment config
        stage = reproduce.load_config(reproduce.ReproduceConfig, reproduce.DEFAULT_CONFIG).train
        runs = [d for d in docs[1:] if "model" in d]
        assert [d["run"]["name"] for d in runs] == [stage.run_name(m, s) for m in stage.models for s in stage.seeds]
        experiments = docs[1 + len(runs):]
        assert len(experiments) == len(stage.seeds)
        assert all(d["output"].startswith("s3://our-bucket/bagnet/results/") for d in experiments)


def test_print_config_still_validates(no_ray):
    with pytest.raises(SystemExit, match=r"optim\.lr"):
        train.main(["--print-config", "optim.lr=-1"])
