"""The reproduce run's experiment stage through Ray and as a plain loop in one process, side by side.

The work: the experiment stage of ``configs/reproduce-synthetic.yaml`` (``--config``), i.e. its
experiment config with the stage's overrides (test images, pairs per distance, masking
settings, ...) and every experiment it names on every model, evaluated from the training stage's
``model.pt`` files (``--train-dir``, ``--seed``) or randomly initialised (``--untrained``).

- ``ray``: what the reproduce run's experiment stage runs (``cluster.evaluation.make_plan`` and
  ``run_plan`` under the run lock, as ``jobs/experiment.py``) into a fresh folder, Ray started
  inside the timing (``RAY_ADDRESS``: a running cluster is joined instead).
- ``plain``: the same plan in this process without Ray: the images generated here once, then per
  model the experiment job's own model code (``cluster.evaluation.ModelActor``: the model and its
  helper models built once, each experiment's ``run`` on each batch of ``compute.batch_size``
  images with ``compute.torch_threads`` threads, its rows written to Parquet through
  ``store.results``) and each part's marker committed.

The plain loop runs first (Ray is not up yet). Both sides write the same parts, and the rows of
every part are checked equal. Per model: the seconds of its pass, model load included (Ray: the
actor's start too); "start-up + images": the rest of each side (Ray's start, the images made
once, the run manifest; with ``compute.concurrent_models`` > 1 Ray's passes overlap, so only
the plain side's); "total": each side's whole wall time. speed = plain_s / ray_s (goal for
the total: >= 0.8). Synthetic data only (the plain loop generates the images).

    python -m bench.experiment_stage                 # after python jobs/reproduce.py: seed 0's models
    python -m bench.experiment_stage --seed 1 --train-dir results/train
    python -m bench.experiment_stage --quick              # a few seconds of model work: checks it runs
    python -m bench.experiment_stage --untrained --models bagnet9_small resnet_small --test-size 16 \\
        experiments.masking.heatmap_model=bagnet9_small
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bagnet.config import ConfigError, load_config, require, to_dict, updated
from bench.harness import Table, machine_info, print_goal
from bench.throughput import write_csv
from cluster import evaluation
from cluster.configs import CONFIG_DIR, ExperimentJobConfig, ReproduceConfig, check_output, config_path
from cluster.images import synthetic_batch
from cluster.paths import job_paths
from store import lock, results

COLUMNS = ["model", "parts", "rows", "plain_s", "ray_s", "speed", "images", "threads", "weights", "note"]
GOAL = 0.8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.experiment_stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG_DIR / "reproduce-synthetic.yaml"), help="reproduce config")
    p.add_argument("--train-dir", default=None, help="the training stage's storage (default: its train.storage_path)")
    p.add_argument("--seed", type=int, default=None, help="evaluate this seed's models (default: its first seed)")
    p.add_argument("--untrained", action="store_true", help="randomly initialised models (no training needed)")
    p.add_argument("--models", nargs="+", default=None, help="only these models of the experiment config")
    p.add_argument("--experiments", default=None, help="comma-separated names (default: the stage's, e.g. all)")
    p.add_argument("--test-size", type=int, default=None, help="images (data.test_size; default: the stage's)")
    p.add_argument("--work", default=None, help="keep both runs' results in a new folder under this one")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --untrained --models bagnet9_small --test-size 8, masking's ranking on it")
    p.add_argument("--out", default="bench/out/experiment_stage.csv")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="experiment-config overrides after the stage's, e.g. experiments.masking.ig_steps=4")
    a = p.parse_args(argv)
    if a.quick:  # what the command line gives wins
        a.untrained, a.models, a.test_size = True, a.models or ["bagnet9_small"], a.test_size or 8
        a.overrides = ["experiments.masking.heatmap_model=bagnet9_small", *a.overrides]
    return a


def stage_config(a: argparse.Namespace) -> tuple[ExperimentJobConfig, str, Path]:
    """The experiment config the reproduce run's stage would run for ``--seed`` (with this
    benchmark's selections), the experiment names, and the config file the run id comes from."""
    try:
        rcfg = load_config(ReproduceConfig, a.config)
        changes: dict = {"experiments": {"overrides": [*rcfg.experiments.overrides, *a.overrides]}}
        if a.train_dir:
            changes["train"] = {"storage_path": a.train_dir}
        rcfg = updated(rcfg, changes)
        exp = rcfg.experiment_config(rcfg.train.seeds[0] if a.seed is None else a.seed)
        names = [m.name for m in exp.models]
        unknown = sorted(set(a.models or ()) - set(names))
        require(not unknown, "--models", f"{unknown} not in the experiment config's models {names}")
        models = [{**to_dict(m), **({"weights": None} if a.untrained else {})}
                  for m in exp.models if not a.models or m.name in a.models]
        exp = updated(exp, {"models": models, **({"data": {"test_size": a.test_size}} if a.test_size else {})})
        require(exp.data.dataset == "synthetic", "data.dataset", "the plain loop generates synthetic images only")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return exp, a.experiments or rcfg.experiments.names, config_path(rcfg.experiments.config)


def make_plan(cfg: ExperimentJobConfig, names: str, config_file: Path, output: str) -> evaluation.Plan:
    cfg = job_paths(updated(cfg, {"output": output}))
    check_output(cfg.output, "output")
    try:
        return evaluation.make_plan(cfg, evaluation.parse_experiments(names), config_file)
    except ConfigError as err:
        hint = " (train them: python jobs/reproduce.py; or pass --untrained)" if "weights" in str(err) else ""
        raise SystemExit(f"error: {err}{hint}") from None


def run_ray(cfg: ExperimentJobConfig, names: str, config_file: Path, output: str) -> str:
    """The reproduce run's experiment stage (``jobs/experiment.py``'s ``run``); its run folder."""
    plan = make_plan(cfg, names, config_file, output)
    with lock.acquire(plan.run_dir, job=f"experiment {plan.run_id}"):
        evaluation.run_plan(plan)
    return plan.run_dir


def run_plain(cfg: ExperimentJobConfig, names: str, config_file: Path, output: str) -> str:
    """The same plan in this process, no Ray: images made once, then one model at a time through
    ``ModelActor`` over the batches, each part committed; its run folder."""
    plan = make_plan(cfg, names, config_file, output)
    ids, size = range(plan.source.num_images), cfg.compute.batch_size
    batches = [synthetic_batch(cfg.data, cfg.split, ids[s:s + size]) for s in range(0, len(ids), size)]
    for model, parts in evaluation.group_parts(plan.todo).items():
        start = time.perf_counter()
        actor = evaluation.ModelActor(**evaluation.actor_kwargs(plan, parts))
        load_s = time.perf_counter() - start
        progress = {part.experiment: evaluation.PartProgress() for part in parts}
        for batch in batches:
            out = actor(batch)
            evaluation.tally(progress, {col: out[col].tolist() for col in evaluation.COLUMNS})
        timing = {"group": f"{'+'.join(progress)}/{model}", "group_seconds": round(time.perf_counter() - start, 3),
                  "startup_s": round(load_s, 3)}
        for part in parts:
            evaluation.commit(part, progress[part.experiment], plan.source.num_images, timing)
    return plan.run_dir


def timed(fn, *args) -> tuple[str, float]:
    start = time.perf_counter()
    run_dir = fn(*args)
    return run_dir, time.perf_counter() - start


def by_model(parts: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Completed parts (``store.results.completed_parts``) grouped by their ``model=`` partition."""
    out: dict[str, dict[str, dict]] = {}
    for rel, marker in parts.items():
        model = dict(kv.split("=", 1) for kv in rel.split("/")[1:])["model"]
        out.setdefault(model, {})[rel] = marker
    return out


def check_equal_rows(plain: dict[str, dict], ray: dict[str, dict]) -> None:
    """Both runs wrote the same parts with the same rows each; prints the rows per table."""
    plain_rows = {rel: m["rows"] for rel, m in plain.items()}
    ray_rows = {rel: m["rows"] for rel, m in ray.items()}
    if plain_rows != ray_rows:
        diff = {rel: (plain_rows.get(rel), ray_rows.get(rel)) for rel in {*plain_rows, *ray_rows}
                if plain_rows.get(rel) != ray_rows.get(rel)}
        raise AssertionError(f"not the same work: rows (plain, ray) differ for {diff}")
    for table, n in results.rows_per_table(plain).items():
        print(f"rows of {table}: plain {n} = ray {results.rows_per_table(ray)[table]}", flush=True)


def main(argv: Sequence[str] | None = None) -> Table:
    a = parse_args(argv)
    cfg, names, config_file = stage_config(a)
    models = [m.name for m in cfg.models]
    weights = "random" if a.untrained else "trained"
    print(f"experiment stage of {a.config}: {names} on {', '.join(models)} ({weights}), "
          f"{cfg.data.synthetic_size(cfg.split)} {cfg.split} images, batch {cfg.compute.batch_size}, "
          f"{cfg.compute.torch_threads} torch threads", flush=True)
    prefix = "experiment-stage-"
    keep = contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix, dir=a.work)) if a.work else None
    with keep or tempfile.TemporaryDirectory(prefix=prefix) as work:
        print("[plain] one process, no Ray ...", flush=True)
        plain_dir, plain_s = timed(run_plain, cfg, names, config_file, str(Path(work, "plain")))
        print("[ray] cluster.evaluation, Ray started here ...", flush=True)
        ray_dir, ray_s = timed(run_ray, cfg, names, config_file, str(Path(work, "ray")))
        plain_parts, ray_parts = results.completed_parts(plain_dir), results.completed_parts(ray_dir)
        if a.work:
            print(f"results kept in {work}", flush=True)
    check_equal_rows(plain_parts, ray_parts)
    info = machine_info("cpu", cfg.precision, batch_size=cfg.compute.batch_size)
    table = Table(COLUMNS, info, width=10)
    common = dict(images=cfg.data.synthetic_size(cfg.split), threads=cfg.compute.torch_threads, weights=weights)
    plain_models, ray_models = by_model(plain_parts), by_model(ray_parts)
    group_s = {"plain": 0.0, "ray": 0.0}
    for model in models:
        p, r = next(iter(plain_models[model].values())), next(iter(ray_models[model].values()))
        group_s["plain"] += p["group_seconds"]
        group_s["ray"] += r["group_seconds"]
        table.add(model=model, parts=len(plain_models[model]), rows=sum(m["rows"] for m in plain_models[model].values()),
                  plain_s=p["group_seconds"], ray_s=r["group_seconds"], speed=p["group_seconds"] / r["group_seconds"],
                  note=f"model load {p['startup_s']:.1f} s; ray first results after {r['startup_s']:.1f} s", **common)
    rest_plain, rest_ray = plain_s - group_s["plain"], ray_s - group_s["ray"]
    if cfg.compute.concurrent_models == 1:
        table.add(model="start-up + images", plain_s=rest_plain, ray_s=rest_ray, speed=rest_plain / rest_ray,
                  note="ray: Ray's start, the images made once, the manifest; plain: the images made once", **common)
    else:  # Ray's passes overlap: their seconds add up to more than its wall time
        table.add(model="start-up + images", plain_s=rest_plain,
                  note=f"ray: passes overlap (compute.concurrent_models={cfg.compute.concurrent_models}), "
                       f"their seconds sum to {group_s['ray']:.1f}", **common)
    rows = sum(m["rows"] for m in plain_parts.values())
    table.add(model="total", parts=len(plain_parts), rows=rows, plain_s=plain_s, ray_s=ray_s, speed=plain_s / ray_s,
              note="whole wall time of each side", **common)
    print_goal("experiment stage: ray speed / plain", plain_s / ray_s, GOAL)
    write_csv(table, a.out)
    return table


if __name__ == "__main__":
    main()
