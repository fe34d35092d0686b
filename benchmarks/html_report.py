"""One self-contained HTML file for a report (``study.html``, ``compare.html``): opens offline, loads nothing.

A page is one or more :class:`Section`: what produced it (model, types, budget, protocol, reference), notes, the
summary tables (sortable), the plots (PNG as ``data:`` URIs) and a pair explorer (per run, a filterable list of
pairs; a pair shows the reference's and the run's reasoning side by side, the first difference marked).

Every string a model wrote (and every query, passage and id) reaches the page as data: the tables are escaped here,
and the explorer's pairs are JSON in a ``<script type="application/json">`` block (``<``, ``>`` and ``&`` escaped),
put on the page by the script as text, never as markup. The page's Content-Security-Policy allows only its own
inline style and script (by hash) and ``data:`` images, so nothing else can run or load even if a string got through.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from benchmarks.pair_views import PairView, select_pairs

FIXTURE_WARNING = ("Fixture model: these numbers test rank1-local's machinery (does the report detect what "
                   "quantization changes), not the quality of rank1 or of any real model.")
_LEADING_NUMBER = re.compile(r"^\s*[<>]?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class Table:
    heading: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    intro: str | None = None


@dataclass(frozen=True)
class Plot:
    caption: str
    png: bytes


@dataclass
class PairSet:
    """Each run's pairs against the reference (``runs``: label -> every pair both hold), with the queries' and the
    passages' text where the report has them."""

    reference: str
    runs: dict[str, list[PairView]]
    unit: str  # of PairView.divergence: "tokens" or "characters"
    queries: dict[str, str] = field(default_factory=dict)  # qid -> query
    passages: dict[tuple[str, str], str] = field(default_factory=dict)  # (qid, docid) -> passage


@dataclass
class Section:
    title: str
    facts: list[tuple[str, str]]  # what produced the numbers: model, types, budget, protocol, reference …
    notes: list[str] = field(default_factory=list)  # paragraphs (**bold** and `code` are kept)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    pairs: PairSet | None = None
    fixture: bool = False  # a fixture model: say that its numbers test the machinery


def fixture_name(model: str | None) -> str | None:
    """The fixture a model path is (or was exported from), by the fixture cache's names (``behaving-<digest>``), or
    None."""
    if not model:
        return None
    from quantize.fixtures import FIXTURES

    names = "|".join(re.escape(n) for n in sorted(FIXTURES, key=len, reverse=True))
    pattern = re.compile(rf"^({names})-[0-9a-f]{{12}}(?:$|[-.])")
    path = Path(model)
    if (path / "fixture.json").is_file() or (path.parent / "fixture.json").is_file():
        return path.name if (path / "fixture.json").is_file() else path.parent.name
    for part in reversed(path.parts):
        match = pattern.match(part)
        if match:
            return match.group(1)
    return None


def sort_key(text: str) -> str:
    """The number a cell sorts by (the number it starts with: ``0.6 [0.0, 1.5] (2)`` is 0.6, ``<0.0001`` is
    0.0001), or "" for a cell that is text or empty (``Q8_0``, ``–``)."""
    match = _LEADING_NUMBER.match(text.replace("−", "-"))
    return match.group(1) if match else ""


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` kept."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(table: Table) -> list[str]:
    out = [f"<h3>{html.escape(table.heading)}</h3>"]
    if table.intro:
        out.append(f"<p>{_inline(table.intro)}</p>")
    out.append('<div class="scroll"><table class="sortable"><thead><tr>')
    out += [f'<th scope="col" title="sort">{html.escape(c)}</th>' for c in table.columns]
    out.append("</tr></thead><tbody>")
    for row in table.rows:
        cells = "".join(f'<td data-sort="{html.escape(sort_key(c))}">{html.escape(c)}</td>' for c in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table></div>")
    return out


def pairs_data(pairs: PairSet) -> dict[str, Any]:
    """The explorer's data: every string once (chains repeat across runs), pairs by index into it."""
    strings: list[str] = []
    index: dict[str, int] = {}

    def ref(text: str | None) -> int | None:
        if text is None:
            return None
        if text not in index:
            index[text] = len(strings)
            strings.append(text)
        return index[text]

    runs = []
    for label, views in pairs.runs.items():
        listed = select_pairs(views)
        runs.append({
            "label": label, "total": len(views), "flips": sum(v.flipped for v in views),
            "forced": sum(v.forced for v in views), "differ": sum(v.divergence is not None for v in views),
            "pairs": [{"q": v.qid, "d": v.docid, "a": v.reference_score, "b": v.run_score,
                       "ra": ref(v.reference_reasoning), "rb": ref(v.run_reasoning), "ta": v.reference_tokens,
                       "tb": v.run_tokens, "fa": v.reference_forced, "fb": v.run_forced, "v": v.divergence,
                       "p": ref(pairs.passages.get((v.qid, v.docid)))} for v in listed]})
    queries = {qid: ref(text) for qid, text in pairs.queries.items()}
    return {"reference": pairs.reference, "unit": pairs.unit, "strings": strings, "queries": queries, "runs": runs}


def _json_block(data: Any) -> str:
    """JSON that cannot end its <script> block or start markup: <, > and & as \\u escapes."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _section(i: int, section: Section) -> list[str]:
    out = [f'<section class="report" id="section-{i}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.fixture:
        out.append(f'<p class="fixture" role="note">{html.escape(FIXTURE_WARNING)}</p>')
    out.append('<dl class="facts">')
    for name, value in section.facts:
        out.append(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>")
    out.append("</dl>")
    out += [f"<p>{_inline(note)}</p>" for note in section.notes]
    for plot in section.plots:
        src = "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")
        out.append(f'<figure><img alt="{html.escape(plot.caption)}" src="{src}">'
                   f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>")
    for table in section.tables:
        out += _table(table)
    if section.pairs is not None and section.pairs.runs:
        out += ["<h3>Pairs</h3>",
                "<p>Per run, its pairs against the reference; pick a pair to see both reasoning chains side by side, "
                "from the first difference on marked. P(true) and P(false) are the model's probabilities of the two "
                "answers, normalized over the two (the score is P(true)).</p>",
                f'<div class="explorer" data-pairs="pairs-{i}"></div>',
                f'<script type="application/json" id="pairs-{i}">{_json_block(pairs_data(section.pairs))}</script>']
    out.append("</section>")
    return out


def _asset(name: str) -> str:
    return (resources.files("benchmarks") / "report_assets" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_page(title: str, sections: Sequence[Section]) -> str:
    """The whole page: one file, its style and script inline, nothing loaded from anywhere."""
    style, script = _asset("report.css"), _asset("report.js")
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}; script-src {_csp_hash(script)}; "
           "base-uri 'none'; form-action 'none'")
    out = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title>", f"<style>{style}</style>", "</head>", "<body>",
           f"<header><h1>{html.escape(title)}</h1><p class=\"made\">Written by rank1-local: one file that loads "
           "nothing from anywhere. Click a column heading to sort a table.</p></header>"]
    if len(sections) > 1:
        out.append("<nav><ul>" + "".join(f'<li><a href="#section-{i}">{html.escape(s.title)}</a></li>'
                                         for i, s in enumerate(sections)) + "</ul></nav>")
    for i, section in enumerate(sections):
        out += _section(i, section)
    out += [f"<script>{script}</script>", "</body>", "</html>"]
    return "\n".join(out) + "\n"
