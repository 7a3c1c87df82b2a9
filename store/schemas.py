"""Schemas of the tables that are not experiment tables (each experiment declares its own
``SCHEMA``; the columns every experiment row shares are ``store.results.COMMON_SCHEMA``).

The sweep's trial table: written by ``cluster.sweep``, read by ``analysis``. Its fixed columns are
below; one column per search-space key follows (``optim.lr`` -> ``optim_lr``), and the Parquet
file's metadata names them (:data:`TUNE_PARAMS_KEY`) with the metric the sweep optimised
(:data:`TUNE_METRIC_KEY`), so a reader never guesses columns from their names.
"""

from __future__ import annotations

import json

import pyarrow as pa

TUNE_TABLE = "tune_trials"
TUNE_FILE = f"{TUNE_TABLE}.parquet"
TUNE_PARAMS_KEY = b"bagnet.search_space"  # JSON list of the parameter columns
TUNE_METRIC_KEY = b"bagnet.metric"  # JSON {"metric": "val_top1", "mode": "max"}
METRICS: dict[str, str] = {  # reported every epoch; the sweep keeps the last and the best of each
    "val_top1": "max", "val_top5": "max", "val_loss": "min", "train_top1": "max", "train_loss": "min"}

TUNE_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("trial_id", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("model", pa.string()),
    ("q", pa.int64()),
    ("dataset", pa.string()),
    ("seed", pa.int64()),
    ("epochs", pa.int64()),
    ("max_epochs", pa.int64()),
    ("stopped_early", pa.bool_()),
    *[(f"{m}_{which}", pa.float64()) for m in METRICS for which in ("last", "best")],
    ("checkpoint_path", pa.string()),
    ("train_run", pa.string()),
    ("trial_dir", pa.string()),
    ("created_at", pa.float64()),
])


def param_column(key: str) -> str:
    """The trial-table column of search-space key ``key``."""
    return key.replace(".", "_")


def tune_metadata(params: list[str], metric: str, mode: str) -> dict[bytes, bytes]:
    return {TUNE_PARAMS_KEY: json.dumps([param_column(k) for k in params]).encode(),
            TUNE_METRIC_KEY: json.dumps({"metric": metric, "mode": mode}).encode()}


def read_tune_metadata(schema: pa.Schema) -> tuple[list[str], dict[str, str]]:
    """``(parameter columns, {"metric", "mode"})`` of a trial table written with :func:`tune_metadata`."""
    meta = schema.metadata or {}
    if TUNE_PARAMS_KEY not in meta or TUNE_METRIC_KEY not in meta:
        raise ValueError("the trial table lacks its search-space metadata (written by an older version?)")
    return json.loads(meta[TUNE_PARAMS_KEY]), json.loads(meta[TUNE_METRIC_KEY])
