"""Print the schema of every result table, from the code that enforces it: the common columns
(``store.results.COMMON_SCHEMA``), each registered experiment's ``SCHEMA`` and the sweep's trial
table (``store.schemas.TUNE_SCHEMA``).

    python -m analysis.schemas                       # Markdown tables
    python -m analysis.schemas --module my_pkg.rotate   # with an outside experiment module
"""

from __future__ import annotations

import argparse

import pyarrow as pa

from bagnet.experiments import EXPERIMENTS
from store.results import COMMON_SCHEMA
from store.schemas import TUNE_SCHEMA, TUNE_TABLE


def markdown(schema: pa.Schema) -> str:
    return "\n".join(["| column | type |", "| --- | --- |", *(f"| `{f.name}` | {f.type} |" for f in schema)])


def schemas_markdown() -> str:
    parts = ["## Columns of every experiment row", markdown(COMMON_SCHEMA)]
    for name in EXPERIMENTS:
        module = EXPERIMENTS[name]
        parts += [f"## `{module.TABLE}` (experiment `{name}`, {module.__name__})", markdown(module.SCHEMA)]
    parts += [f"## `{TUNE_TABLE}` (fixed columns; one more per search-space key)", markdown(TUNE_SCHEMA)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m analysis.schemas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", default=[], metavar="DOTTED",
                        help="also list this experiment module (importable dotted path)")
    for dotted in parser.parse_args(argv).module:
        EXPERIMENTS.register(dotted)
    text = schemas_markdown()
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
