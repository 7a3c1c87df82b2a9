"""The report's document model and its two renderings: ``index.html`` and ``report.md``.

Both are rendered from the same :class:`Section` list, so they hold the same tables.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Union

import pandas as pd


@dataclass
class Figure:
    caption: str
    path: str  # relative to the report folder


@dataclass
class Table:
    caption: str
    df: pd.DataFrame


@dataclass
class Details:
    summary: str
    text: str  # preformatted


Block = Union[Figure, Table, Details, str]  # a str is a paragraph


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # tables this section needs but did not find
    source: str = ""  # which run(s) the numbers come from


def fmt(value) -> str:
    """One table cell: floats with 3 decimals, missing values as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) < 5e-4:
            return "0.000"  # no "-0.000"
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.3g}"
    try:
        if pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    return str(value)


def cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    return [str(c) for c in df.columns], [[fmt(v) for v in row] for row in df.itertuples(index=False, name=None)]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}td.n{text-align:right}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.missing{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em}
.source{font-size:.85em;color:#666}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
nav ul{columns:2}.scroll{overflow-x:auto}
"""


NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?(e[-+]?\d+)?$")


def _td(text: str) -> str:
    cls = ' class="n"' if NUMBER.match(text) else ""
    return f"<td{cls}>{html.escape(text)}</td>"


def render_html(title: str, intro: list[str], sections: list[Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    out += [f"<p>{e(p)}</p>" for p in intro]
    links = "".join(f'<li><a href="#{s.anchor}">{e(s.title)}</a></li>' for s in sections)
    out.append(f"<nav><ul>{links}</ul></nav>")
    for s in sections:
        out.append(f'<section id="{s.anchor}"><h2>{e(s.title)}</h2>')
        if s.source:
            out.append(f'<p class="source">{e(s.source)}</p>')
        out += [f'<p class="missing">missing: {e(m)}</p>' for m in s.missing]
        for b in s.blocks:
            if isinstance(b, Figure):
                out.append(f'<figure><img src="{e(b.path)}" alt="{e(b.caption)}" loading="eager">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif isinstance(b, Table):
                head, rows = cells(b.df)
                out.append(f'<div class="scroll"><table><caption>{e(b.caption)}</caption><thead><tr>'
                           + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
                           + "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
                           + "</tbody></table></div>")
            elif isinstance(b, Details):
                out.append(f"<details><summary>{e(b.summary)}</summary><pre>{e(b.text)}</pre></details>")
            else:
                out.append(f"<p>{e(b)}</p>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, intro: list[str], sections: list[Section]) -> str:
    out = [f"# {title}", "", *[p + "\n" for p in intro]]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.source:
            out += [f"_{s.source}_", ""]
        out += [f"> **missing:** {m}\n" for m in s.missing]
        for b in s.blocks:
            if isinstance(b, Figure):
                out += [f"![{b.caption}]({b.path})", ""]
            elif isinstance(b, Table):
                head, rows = cells(b.df)
                out += [f"**{b.caption}**", "", "| " + " | ".join(map(_md_cell, head)) + " |",
                        "|" + "|".join("---" for _ in head) + "|",
                        *("| " + " | ".join(map(_md_cell, r)) + " |" for r in rows), ""]
            elif isinstance(b, Details):
                out += [f"<details><summary>{b.summary}</summary>", "", "```", b.text.rstrip(), "```", "",
                        "</details>", ""]
            else:
                out += [b, ""]
    return "\n".join(out).rstrip() + "\n"
