"""`python -m analysis.schemas` prints the schemas the writer enforces, from the code."""

from __future__ import annotations

import sys

from analysis import schemas
from bagnet.experiments import EXPERIMENTS
from store.results import COMMON_SCHEMA

PROBE = '''
from dataclasses import dataclass
import pyarrow as pa
from bagnet.experiments.base import Summary
TABLE = "probe_table"
SCHEMA = pa.schema([("angle", pa.int64())])
REPORT = Summary(title="Probe", x="angle", x_label="angle", values={"angle": "angle"})
@dataclass
class Params:
    pass
def run(model, images, labels, params, *, ctx):
    return []
'''


def test_every_table_and_column_is_printed(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "schema_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        text = schemas.main(["--module", "schema_probe"])
    finally:
        EXPERIMENTS.unregister("schema_probe")
    assert capsys.readouterr().out == text
    for f in COMMON_SCHEMA:
        assert f"| `{f.name}` | {f.type} |" in text
    for name in EXPERIMENTS:
        section = text.split(f"## `{EXPERIMENTS[name].TABLE}` (experiment `{name}`", 1)[1].split("\n## ", 1)[0]
        assert all(f"| `{f.name}` | {f.type} |" in section for f in EXPERIMENTS[name].SCHEMA)
    assert "## `probe_table` (experiment `schema_probe`, schema_probe)\n\n| column | type |\n| --- | --- |\n| `angle` | int64 |" in text
    assert "schema_probe" not in sys.modules or "schema_probe" not in list(EXPERIMENTS)
