"""The runs behind the report: every run found, which tables each one supplied, the rows read,
the manifests and the training configs."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from analysis.builder import COUNT_KEYS, Builder, as_time, shown_path, when
from analysis.html import Details, Section, Table
from bagnet.experiments import EXPERIMENTS
from store.schemas import TUNE_TABLE


def result_runs(builder: Builder, used_by: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for r in sorted(builder.catalog.runs, key=lambda r: (r.finished, r.name)):
        m = r.manifest or {}  # incomplete runs and sweeps have none
        rows.append({"run": r.name, "complete": "yes" if r.complete else "no",
                     "used for": ", ".join(used_by.get(r.path, [])) or "–", "tables": ", ".join(sorted(r.tables)),
                     "files": sum(len(v) for v in r.tables.values()), "unfinished parts' files": len(r.uncommitted),
                     "rows (manifest)": sum(m["rows_per_table"].values()) if m else "–",
                     "code version": m.get("code_version", "–"), "created": m.get("created_at", "–"),
                     "finished": when(pd.Timestamp(r.finished, unit="s", tz="UTC")) if r.finished else "–",
                     "path": shown_path(r.path)})
    return pd.DataFrame(rows)


def rows_read(builder: Builder) -> pd.DataFrame:
    """Rows read per table, experiment and model (the columns a table has of these)."""
    counts = []
    for table, data in builder.used.items():
        c = data.counts
        group = [k for k in COUNT_KEYS if k in c]  # a sweep's trials have no experiment
        low, high = as_time(c["created_min"]).map(when), as_time(c["created_max"]).map(when)
        for i, row in c.iterrows():
            versions = row["code_versions"][:3] if "code_versions" in c else ["–"]  # not in trial tables
            counts.append({"table": table, "run": data.run.name, "experiment": "–", **{k: row[k] for k in group},
                           "rows": int(row["rows"]), "run_id": ", ".join(map(str, row["run_ids"][:3])),
                           "code version": ", ".join(map(str, versions)),
                           "created": low[i] if low[i] == high[i] else f"{low[i]} … {high[i]}"})
    return pd.DataFrame(counts)


def section(builder: Builder) -> Section:
    sec = Section("The runs behind this report", "runs")
    catalog = builder.catalog
    used_by: dict[str, list[str]] = {}
    for table, data in builder.used.items():
        used_by.setdefault(data.run.path, []).append(table)
    if catalog.runs:
        sec.blocks.append(Table("Result runs found (a table is read from one run only)", result_runs(builder, used_by)))
    else:
        sec.missing.append("no result tables found under " + ", ".join(catalog.roots))
    if builder.used:
        sec.blocks.append(Table("Rows read, per table, experiment and model", rows_read(builder)))
    tables = EXPERIMENTS.tables()
    absent = [name for name, table in tables.items() if not catalog.holds(table)]
    if absent:
        sec.blocks.append(f"Registered experiments without a table under these paths: {', '.join(absent)}.")
    unknown = sorted({t for r in catalog.runs for t in r.tables} - {*tables.values(), TUNE_TABLE})
    if unknown:
        sec.blocks.append(f"Tables of no registered experiment (no section; an experiment module from outside the "
                          f"package must be registered to get one): {', '.join(unknown)}.")
    for path, tables in used_by.items():
        run = next(r for r in catalog.runs if r.path == path)
        if run.manifest:
            shown = {k: (f"{len(v)} parts" if k == "parts" else v) for k, v in run.manifest.items()}
            sec.blocks.append(Details(f"manifest of run {run.name} ({', '.join(tables)})",
                                      json.dumps(shown, indent=2, sort_keys=True, default=str)))
    if catalog.train_runs:
        trows = [{"run": r.name, "model": r.config["model"]["name"], "dataset": r.config["data"]["dataset"],
                  "epochs": len(r.metrics), "complete": "yes" if r.complete else "no", "path": shown_path(r.path)}
                 for r in catalog.train_runs]
        sec.blocks.append(Table("Training runs found", pd.DataFrame(trows)))
        for r in catalog.train_runs:
            sec.blocks.append(Details(f"config of training run {r.name}", yaml.safe_dump(r.config, sort_keys=False)))
    if catalog.stray_metrics:
        sec.blocks.append(f"{len(catalog.stray_metrics)} metrics.parquet file(s) without a config.yaml beside them "
                          "(e.g. a sweep's trial runs) are not listed as training runs.")
    if catalog.unrecognised:
        sec.blocks.append("Parquet files in no known layout (ignored): " + ", ".join(catalog.unrecognised[:10])
                          + (" …" if len(catalog.unrecognised) > 10 else ""))
    return sec
