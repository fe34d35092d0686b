"""The HTML reports (study.html, compare.html) as files: model-written strings reach the page only as escaped data,
the page allows only its own inline style and script, which pairs are listed, fixture models are named, and the
committed example is the one its JSON makes. What a browser does with the page is in tests/test_browser.py."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path

import pytest

from benchmarks.html_report import FIXTURE_WARNING, PairSet, Section, Table, fixture_name, render_page, sort_key
from benchmarks.pair_views import PairView, select_pairs

pytestmark = pytest.mark.quick
ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '</script><script>alert(1)</script><img src=x onerror=alert(2)> & "quotes" \u2028'


def view(qid="q", docid="d", a=0.9, b=0.8, ra="same", rb="same", fa=False, fb=False, divergence=None):
    return PairView(qid, docid, a, b, ra, rb, 10, 10, fa, fb, divergence)


def page_with(strings_everywhere: str) -> str:
    pairs = PairSet("ref", {"Q2_K": [view(ra=strings_everywhere, rb=strings_everywhere + "x", divergence=3,
                                          qid=strings_everywhere, docid=strings_everywhere)]}, "tokens",
                    {strings_everywhere: strings_everywhere},
                    {(strings_everywhere, strings_everywhere): strings_everywhere})
    section = Section(strings_everywhere, [(strings_everywhere, strings_everywhere)], [strings_everywhere],
                      [Table(strings_everywhere, [strings_everywhere], [[strings_everywhere]], strings_everywhere)],
                      [], pairs)
    return render_page(strings_everywhere, [section])


def test_every_string_is_escaped_and_comes_back_as_data():
    """Markup in any string (titles, facts, notes, table cells, chains, queries, passages, ids) is text: the page
    holds no tag but its own, and the explorer's JSON gives the strings back exactly."""
    page = page_with(HOSTILE)
    assert "<script>alert" not in page and "<img src=x" not in page
    block = re.search(r'<script type="application/json" id="pairs-0">(.*?)</script>', page, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    markup = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", page, flags=re.S)  # the page's own style, script, data
    own = {"html", "head", "meta", "title", "body", "header", "h1", "p", "section", "h2", "dl", "dt", "dd", "h3",
           "div", "table", "thead", "tr", "th", "tbody", "td"}
    assert set(re.findall(r"</?([a-zA-Z][a-zA-Z0-9]*)", markup)) == own
    assert page.count("<script") == 2  # the data block and the page's own script
    data = json.loads(block)
    pair = data["runs"][0]["pairs"][0]
    assert data["strings"][pair["ra"]] == HOSTILE and data["strings"][pair["rb"]] == HOSTILE + "x"
    assert pair["q"] == pair["d"] == HOSTILE and data["strings"][pair["p"]] == HOSTILE
    assert data["strings"][data["queries"][HOSTILE]] == HOSTILE


def test_the_page_allows_only_its_own_inline_style_and_script():
    """The Content-Security-Policy names the hashes of the page's one style and one script, allows data: images
    and nothing else: no network, and no script a string could smuggle in."""
    page = page_with("x")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    script = page[page.rindex("<script>") + len("<script>"):page.rindex("</script>")]

    def digest(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert csp == (f"default-src 'none'; img-src data:; style-src {digest(style)}; script-src {digest(script)}; "
                   "base-uri 'none'; form-action 'none'")
    assert "http" not in style + script  # nothing to fetch


def test_chains_are_stored_once():
    chain = "a long chain, " * 50 + "the end"
    pairs = PairSet("ref", {t: [view(docid=str(i), ra=chain, rb=chain) for i in range(20)]
                            for t in ("Q8_0", "Q4_K_M", "Q2_K")}, "tokens")
    page = render_page("t", [Section("t", [], pairs=pairs)])
    assert page.count("the end") == 1


def test_listed_pairs_put_flips_forced_and_differing_chains_first():
    flip = view(docid="flip", a=0.9, b=0.1, divergence=2)
    forced = view(docid="forced", fb=True)
    differs = view(docid="differs", divergence=4)
    large, small = view(docid="large", b=0.6), view(docid="small", b=0.89)
    views = [small, large, differs, forced, flip]
    assert select_pairs(views, 10) == views  # all of them, in their order, when they fit
    assert [v.docid for v in select_pairs(views, 4)] == ["flip", "forced", "differs", "large"]


@pytest.mark.parametrize("text, key", [("0.6 [0.0, 1.5] (2)", "0.6"), ("2/42", "2"), ("<0.0001", "0.0001"),
                                       ("-0.0427 [-0.0684, -0.0203]", "-0.0427"), ("+0.0775", "+0.0775"),
                                       ("1.12e-01 [4.15e-02, 2.04e-01]", "1.12e-01"), ("18 tokens", "18"),
                                       ("Q8_0", ""), ("–", ""), ("", ""), ("reference (ref)", "")])
def test_cells_sort_by_the_number_they_start_with(text, key):
    assert sort_key(text) == key


def test_fixture_models_are_named(tmp_path):
    folder = tmp_path / "anything"
    folder.mkdir()
    (folder / "fixture.json").write_text("{}")
    assert fixture_name(str(folder)) == "anything"
    assert fixture_name("/cache/fixtures/behaving-outliers-5d8bd0e77a13") == "behaving-outliers"
    assert fixture_name("/tmp/exports/behaving/behaving-73d58a0b34b9-Q8_0.gguf") == "behaving"
    assert fixture_name("/models/rank1-7b-Q4_K_M.gguf") is None and fixture_name("jhu-clsp/rank1-7b") is None
    assert html.escape(FIXTURE_WARNING) in render_page("t", [Section("t", [("Model", "m")], fixture=True)])
    assert html.escape(FIXTURE_WARNING) not in render_page("t", [Section("t", [("Model", "m")])])


def test_the_committed_example_page_is_the_one_its_json_makes(tmp_path):
    """benchmarks/results/quant_study.html is what `python benchmarks/quant_study.py --html-only` makes of the
    committed quant_study.json and .png (regenerate it with that command), and its markdown tables are the
    committed quant_study.md's."""
    import shutil

    from benchmarks.quant_study import demote, html_from_json
    from benchmarks.study.report import render_markdown, report_from_json

    results = ROOT / "benchmarks" / "results"
    for name in ("quant_study.json", "quant_study.png"):
        shutil.copy(results / name, tmp_path / name)
    made = html_from_json(tmp_path).read_text(encoding="utf-8")
    assert made == (results / "quant_study.html").read_text(encoding="utf-8"), \
        "regenerate it: python benchmarks/quant_study.py --html-only"
    assert "No pairs here" in made and made.count(html.escape(FIXTURE_WARNING)) == 2
    data = json.loads((results / "quant_study.json").read_text(encoding="utf-8"))
    markdown = render_markdown(report_from_json(data["test_bed"]), "quant_study.png") + "\n" \
        + demote(render_markdown(report_from_json(data["behaving"]), None))
    assert (results / "quant_study.md").read_text(encoding="utf-8").startswith(markdown)
