"""Turn the result tables into the paper's tables and figures: ``index.html`` + ``report.md``.

    python -m analysis.report --results results/experiments --train results/train --out report
    python -m analysis.report --results s3://bucket/bagnet/results --run-id 20250101-abc

Every table is read from one run only: the newest complete run (one with a ``_SUCCESS``
manifest) that holds it, or the run named by ``--run-id``. Training runs (folders with
``metrics.parquet`` + ``config.yaml``) are found under ``--train`` paths and under ``--results``.
With ``--seed-runs`` (experiment runs of one config on the weights of several training seeds,
as ``jobs/reproduce.py`` writes them), each table's rows are read from every one of those runs
and each number is shown as its mean ± standard deviation over seeds; the training runs of one
model (its seeds) are aggregated alike.

Each registered experiment whose table is found gets the section its module's ``REPORT`` names
(the generic one for a ``Summary``). Figures are written as 150-dpi PNG files, each with an SVG
beside it, to ``<out>/figures/`` and referenced relatively.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.builder import Builder, log, shown_path
from analysis.html import Section, render_html, render_markdown
from analysis.sections import runs, summary
from bagnet.experiments import EXPERIMENTS, CustomSection, Summary
from store import storage
from store.catalog import Run, discover
from store.schemas import TUNE_TABLE

TITLE = "BagNet experiments: report"
TRAINING_SECTION = "accuracy"  # the custom section that also shows the training runs and sweeps


def experiment_sections(builder: Builder) -> list[Section]:
    """One section per registered experiment whose table some run holds, as its ``REPORT`` says
    (a custom section once, however many experiments name it); the training section first when
    there are training runs or sweeps."""
    sections: list[Section] = []
    shown: set[str] = set()

    def add_custom(module: str) -> None:
        if module not in shown:
            shown.add(module)
            made = importlib.import_module(f"analysis.sections.{module}").section(builder)
            sections.extend(made if isinstance(made, list) else [made])

    if builder.catalog.train_runs or builder.catalog.holds(TUNE_TABLE):
        add_custom(TRAINING_SECTION)
    for name, module in EXPERIMENTS.items():
        if not builder.catalog.holds(module.TABLE):
            continue
        if isinstance(module.REPORT, Summary):
            sections.append(summary.section(builder, name, module.TABLE, module.REPORT))
        elif isinstance(module.REPORT, CustomSection):
            add_custom(module.REPORT.module)
        else:
            raise TypeError(f"experiment {name!r}: REPORT must be a Summary or a CustomSection, got {module.REPORT!r}")
    return sections


def register_run_modules(runs: Sequence[Run]) -> None:
    """Register the outside experiment modules the runs were computed with (their configs'
    ``modules``), so their tables get their sections; one that cannot be imported here is noted
    and its table listed without a section."""
    for run in runs:
        for dotted in (run.config or {}).get("modules") or []:
            try:
                EXPERIMENTS.register(dotted)
            except (ImportError, ValueError) as err:
                log(f"run {run.name}: experiment module {dotted} not usable here ({err}); its table gets no section")


def build_report(results: str, out: str | None = None, train_paths: Sequence[str] = (),
                 run_id: str | Sequence[str] | None = None, include_incomplete: bool = False,
                 seed_runs: Sequence[str] = ()) -> Path | str:
    """Read the tables under ``results`` (and training runs under ``train_paths``), write
    ``<out>/index.html``, ``<out>/report.md`` and ``<out>/figures/*.png``; return the path of
    ``index.html`` (a ``Path`` for a local ``out``, the URI string for ``s3://``)."""
    results = storage.resolve(results)
    out = storage.resolve(out or (storage.join(results, "report") if not storage.is_remote(results) else "report"))
    run_ids = [run_id] if isinstance(run_id, str) else list(run_id or []) or None
    log(f"scanning {results}" + (f" and {', '.join(train_paths)}" if train_paths else ""))
    catalog = discover([results, *train_paths])
    log(f"found {len(catalog.runs)} result run(s) ({sum(r.complete for r in catalog.runs)} complete) and "
        f"{len(catalog.train_runs)} training run(s)")
    if catalog.empty:
        raise FileNotFoundError(f"no result runs or training runs under {', '.join(catalog.roots)}: nothing to report")
    for folder, reason in catalog.unreadable.items():
        log(f"training run {folder} not read: {reason}")
    register_run_modules(catalog.runs)
    builder = Builder(catalog, out, run_ids, include_incomplete, seed_runs)
    sections = [*experiment_sections(builder), runs.section(builder)]
    intro = [f"Results: {shown_path(results)}"
             + (f"; seed runs (numbers are mean ± spread over them): {', '.join(seed_runs)}" if seed_runs else "")
             + (f"; training runs: {', '.join(map(shown_path, train_paths))}" if train_paths else "")
             + f". Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
             "Each table is read from a single run: the newest complete one holding it"
             + (f" among run ids {', '.join(run_ids)}" if run_ids else "")
             + ("; incomplete runs included on request." if include_incomplete
                else "; runs without a _SUCCESS manifest are skipped.")]
    intro += [f"Training run {shown_path(f)} could not be read and is left out: {why}"
              for f, why in catalog.unreadable.items()]
    index = storage.join(out, "index.html")
    storage.write_text_atomic(index, render_html(TITLE, intro, sections))
    storage.write_text_atomic(storage.join(out, "report.md"), render_markdown(TITLE, intro, sections))
    log(f"{len(sections)} sections, {sum(len(s.missing) for s in sections)} missing table(s) noted")
    return index if storage.is_remote(index) else Path(index)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="results folder, local or s3:// (walked for *.parquet)")
    p.add_argument("--out", help="report folder (default: <results>/report for a local results path, else ./report)")
    p.add_argument("--train", nargs="+", action="extend", default=[], metavar="PATH",
                   help="folders holding training runs (metrics.parquet + config.yaml), searched recursively")
    p.add_argument("--run-id", nargs="+", action="extend", default=[], metavar="ID",
                   help="read tables only from these runs (folder name or manifest run_id); newest first")
    p.add_argument("--include-incomplete", action="store_true", help="also use runs without a _SUCCESS manifest")
    p.add_argument("--seed-runs", nargs="+", action="extend", default=[], metavar="ID",
                   help="experiment runs of one config on several training seeds' weights: tables are read from "
                        "each and shown as mean ± spread over seeds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path | str:
    args = parse_args(argv)
    try:
        index = build_report(args.results, args.out, args.train, args.run_id or None, args.include_incomplete,
                             args.seed_runs)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    base = str(index).rsplit("/", 1)[0]
    print(f"html:     {index}\nmarkdown: {base}/report.md\nfigures:  {base}/figures/")
    return index


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
