"""The browser tier (``python -m pytest -m browser tests``): study.html and the server's playground in headless
Chromium (Debian's chromium and chromium-driver, driven by Selenium), as a user clicks through them. The screenshots
go to the folder the run prints ($RANK1_BROWSER_ARTIFACTS, else the session's temporary folder)."""

from __future__ import annotations

import pytest
from browser_support import (
    FLIPS,
    INJECTED,
    InProcessServer,
    by_css,
    console_errors,
    one,
    open_page,
    synthetic_study,
    wait_for,
)

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.browser
KEY = "playground-key-123"


# --- study.html ------------------------------------------------------------------------------------------------------

def test_study_html_shows_a_flipped_pairs_two_chains(browser, tmp_path, artifacts):
    """Opened from disk (no server, nothing loaded): the honest edges are there, the tables sort, and a flipped pair
    picked from the Q2_K list shows both chains side by side with the first difference marked; a chain holding
    <script> and an onerror image is shown as text and runs nothing."""
    from selenium.webdriver.support.ui import Select

    from benchmarks.html_report import FIXTURE_WARNING

    page, chains = synthetic_study(tmp_path)
    open_page(browser, page.as_uri())
    body = one(browser, "body").text
    assert FIXTURE_WARNING in body
    for fact in ("Q8_0, Q2_K", "official, reasoning budget 64 tokens, context 512",
                 "reference-transformers-float32: transformers (transformers cpu float32)"):
        assert fact in body
    assert browser.execute_script("return arguments[0].naturalWidth", one(browser, "figure img")) > 200

    flips = by_css(browser, "table.sortable")[0]  # Decisions and scores: Q8_0 (0 flips), Q2_K (2 flips)
    heading = [th for th in flips.find_elements("css selector", "th") if th.text.startswith("flips")][0]
    heading.click()
    heading.click()  # descending: the most flips first
    assert heading.get_attribute("aria-sort") == "descending"
    assert [tr.find_element("css selector", "td").text for tr in flips.find_elements("css selector", "tbody tr")] \
        == ["Q2_K", "Q8_0"]

    Select(one(browser, ".explorer select.run")).select_by_index(1)
    one(browser, '.explorer input[value="flips"]').click()
    rows = {(r.get_attribute("data-qid"), r.get_attribute("data-docid")): r
            for r in by_css(browser, ".explorer tbody tr")}
    assert sorted(rows) == sorted(FLIPS) and all("flip" in r.text for r in rows.values())
    for key in FLIPS[::-1]:  # the one with markup, then the other (left on screen)
        rows[key].click()
        reference = one(browser, ".detail pre.chain.reference").get_attribute("textContent")
        run = one(browser, ".detail pre.chain.run").get_attribute("textContent")
        assert (reference, run) == (chains["reference"][key], chains["Q2_K"][key])
        cut = next(i for i, (x, y) in enumerate(zip(reference, run)) if x != y)
        assert [m.text for m in by_css(browser, ".detail pre.chain mark")] == [reference[cut], run[cut]]
        if key == FLIPS[1]:
            for kind in ("reference", "run"):
                assert one(browser, f".detail pre.chain.{kind}").text.count(INJECTED) == 2
            assert browser.execute_script("return window.__pwned === undefined")
    detail = one(browser, ".detail").text
    assert "0.6400" in detail and "0.3100" in detail and "What is known about the <apple>?" in detail
    assert "P(true), P(false)" in detail and "0.3100, 0.6900" in detail
    browser.execute_script("arguments[0].scrollIntoView()", by_css(browser, "h3")[-1])
    browser.save_screenshot(str(artifacts / "study.png"))
    assert console_errors(browser) == []


# --- the playground --------------------------------------------------------------------------------------------------

def use_playground(driver, url, query, documents, key=None):
    """Type a query and documents into the page (and the key, if any), rerank, wait for the end; what the page shows:
    each document's reasoning by index, and the ranking as (index, score text)."""
    open_page(driver, url + "/")
    if key is not None:
        wait_for(driver, lambda d: "needs an API key" in one(d, "#server-status").text, message="no key prompt")
        one(driver, "#api-key").send_keys(key)
        one(driver, "#use-key").click()
    wait_for(driver, lambda d: one(d, "#model-name").text not in ("", "…"), message="the model info never came")
    one(driver, "#query").send_keys(query)
    one(driver, "#documents").send_keys("\n".join(documents))
    one(driver, "#submit").click()
    wait_for(driver, lambda d: one(d, "#run-status").text.startswith(("done", "HTTP", "the request")), timeout=300,
             message="the rerank never finished")
    assert one(driver, "#run-status").text.startswith("done"), one(driver, "#run-status").text
    reasoning = {int(c.get_attribute("data-index")): c.find_element("css selector", "pre.reasoning")
                 .get_attribute("textContent") for c in by_css(driver, "#documents-out .doc")}
    ranking = [(int(li.get_attribute("data-index")), li.find_element("css selector", ".score").text)
               for li in by_css(driver, "#ranking li")]
    return reasoning, ranking


def check_against_the_api(url, query, documents, reasoning, ranking, headers=None):
    """The page showed what POST /v1/rerank answers: every document's reasoning, the order and the scores."""
    r = httpx.post(url + "/v1/rerank", json={"query": query, "documents": documents, "return_reasoning": True},
                   headers=headers or {}, timeout=300)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert reasoning == {row["index"]: row["reasoning"] for row in rows}
    assert ranking == [(row["index"], f"{row['relevance_score']:.4f}") for row in rows]


def test_playground_with_an_api_key_on_the_scripted_engine(browser, artifacts):
    """The real app and pipeline over the scripted engine, under uvicorn: the page asks for the key, shows what is
    served, streams each document's reasoning and the ranking as /v1/rerank gives them; the key is in no URL and in
    no storage; markup the model writes is text; nothing loads from anywhere else."""
    from fake_engine import RecordingEngine, scripted, scripted_rank1

    from rank1_local.core.config import ScoringConfig
    from rank1_local.server.app import ServerSettings, create_app

    scripts = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic.</think>",
               "markup": '\nIt says <img src=x onerror="window.__pwned = 3"> here.</think>'}
    model = scripted_rank1(RecordingEngine(scripted(scripts)), 2, ScoringConfig(max_think_tokens=256, n_ctx=2048))
    server = InProcessServer(create_app(model, ServerSettings(model_name="scripted-model", api_key=KEY)))
    try:
        documents = ["an off doc", "a relevant doc", "a markup doc", "another relevant doc", "off again"]
        reasoning, ranking = use_playground(browser, server.url, "Which doc?", documents, key=KEY)
        check_against_the_api(server.url, "Which doc?", documents, reasoning, ranking,
                              {"Authorization": f"Bearer {KEY}"})
        assert ranking[0][0] in (1, 3) and "<img" in reasoning[2]
        served = one(browser, "#served").text
        assert "scripted-model" in served and "llama.cpp" in served and "official, reasoning budget 256" in served
        assert browser.execute_script("return window.__pwned === undefined")
        assert KEY not in browser.current_url
        assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(name.startswith(server.url + "/") for name in loaded), loaded
        browser.save_screenshot(str(artifacts / "playground-scripted.png"))
        assert console_errors(browser, expected=("/v1/models - Failed to load resource: the server responded with "
                                                 "a status of 401",)) == []  # before the key was typed
    finally:
        server.stop()
        model.close()


@pytest.mark.parametrize("backend", ["llama.cpp", "transformers"])
def test_playground_on_the_behaving_fixture(backend, browser, artifacts, exported, fixture_dir, tmp_path):
    """``rank1-local serve`` on the behaving fixture, its Q8_0 GGUF on llama.cpp and its checkpoint on transformers:
    the reasoning the page streams and its final order are /v1/rerank's, the same word first."""
    from benchmarks.server_process import ServerProcess
    from quantize.fixtures.synthetic_task import make_pair

    if backend == "llama.cpp":
        model, args = exported("behaving", "Q8_0"), ["--parallel", "4", "--threads", "2"]
    else:
        model, args = fixture_dir("behaving"), ["--backend", "transformers"]
    args += ["--n-ctx", "512", "--max-think-tokens", "64", "--name", f"behaving-fixture ({backend})"]
    query = make_pair("apple", "apple").query
    documents = [make_pair("apple", w).passage for w in ("horse", "apple", "cherry", "lemon", "tiger")]
    with ServerProcess(model, args, tmp_path / "server.log") as server:
        try:
            reasoning, ranking = use_playground(browser, server.url, query, documents)
        except Exception:
            print(f"the server (exit status {server.proc.poll()}) logged:\n{server.log()}")  # shown on failure
            raise
        check_against_the_api(server.url, query, documents, reasoning, ranking)
        assert ranking[0][0] == 1 and backend in one(browser, "#served").text
        browser.set_window_size(1280, 1650)
        browser.save_screenshot(str(artifacts / f"playground-{backend}.png"))
        browser.set_window_size(1280, 1000)
        assert console_errors(browser) == []
