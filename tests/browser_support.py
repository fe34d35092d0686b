"""Helpers of the browser tier (``-m browser``): headless Chromium driven by Selenium, an in-process server on a free
port, a small study made from hand-written run files, and the folder the screenshots go to."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# what Chromium needs here: no sandbox (root), no GPU, and none of its own network traffic (this network is closed)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
ARTIFACTS_ENV = "RANK1_BROWSER_ARTIFACTS"


def start_chromium():  # -> selenium.webdriver.Chrome
    """Debian's Chromium through its ChromeDriver, headless, with a fresh profile. Asked for with ``-m browser`` and
    not installed: a failure that says how to install it (never a silent skip)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tier needs Selenium: pip install 'rank1-local[dev]' (or pip install selenium)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"the browser tier needs {', '.join(missing)}: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="rank1-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.profile_dir = profile
    return driver


def stop_chromium(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def by_css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector: str):
    (found,) = by_css(driver, selector)
    return found


def wait_for(driver, condition, timeout: float = 30.0, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def open_page(driver, url: str) -> None:
    """Load ``url``, after dropping what earlier pages logged (so an earlier test's errors are not this one's)."""
    driver.get_log("browser")
    driver.get(url)


def console_errors(driver, expected: tuple[str, ...] = ()) -> list[str]:
    """What the page logged as errors (a Content-Security-Policy violation, a failed load, a script error) since the
    last call, but for those holding one of ``expected``."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)]


class InProcessServer:
    """The ASGI app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        from benchmarks.server_process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# --- a small study from hand-written run files -----------------------------------------------------------------------

INJECTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
CATEGORY = {"apple": "fruit", "lemon": "fruit", "cherry": "fruit", "horse": "animal", "tiger": "animal",
            "wolf": "animal", "zinc": "metal", "iron": "metal", "gold": "metal"}
PASSAGES = {"apple": ("apple", "lemon", "cherry", "horse"), "horse": ("horse", "tiger", "wolf", "iron"),
            "zinc": ("zinc", "gold", "iron", "cherry")}
SCORES = [0.99, 0.64, 0.41, 0.01, 0.98, 0.7, 0.55, 0.02, 0.99, 0.45, 0.52, 0.01]
FLIPS = [("apple", "lemon"), ("horse", "tiger")]  # Q2_K's; both chains of horse/tiger hold markup
FORCED = ("zinc", "cherry")


def _chain(query: str, passage: str, verdict: str) -> str:
    return (f"The query asks about {query} ({CATEGORY[query]}). The passage is about {passage} "
            f"({CATEGORY[passage]}). {verdict}")


def _verdict(query: str, passage: str) -> str:
    return "Same topic." if query == passage else "Same category." if CATEGORY[query] == CATEGORY[passage] \
        else "Different topics."


def _rows(scores: dict, chains: dict, forced: set, tokens: int) -> str:
    return "".join(json.dumps({"qid": q, "docid": d, "score": s, "relevant": s > 0.5, "reasoning": chains[(q, d)],
                               "n_tokens": tokens + (40 if (q, d) in forced else 0), "forced": (q, d) in forced})
                   + "\n" for (q, d), s in scores.items())


def _header(run_file: Path, model: str, backend: str, device: str, settings: dict) -> None:
    from rank1_local.runs.run_header import RunHeader, header_path

    header = RunHeader(model=model, model_file=model, model_bytes=1000, backend=backend, device=device,
                       settings=settings, pairs=12, seconds=2.0)
    header_path(run_file).write_text(json.dumps(header.to_json()))


def synthetic_study(folder: Path) -> tuple[Path, dict]:
    """study.html of a study of Q8_0 and Q2_K against a transformers reference on 12 pairs (3 queries), written by
    the study's own report code from hand-written run files in the style of the behaving fixture's task: Q8_0 keeps
    every decision and chain; Q2_K flips two pairs (:data:`FLIPS`), rewrites their chains and is forced on
    :data:`FORCED`. The model folder is named like a fixture. Returns the page and what the test expects of it."""
    from benchmarks.study.exports import parse_study_types
    from benchmarks.study.inputs import StudyInputs
    from benchmarks.study.report import analyse_study, write_report
    from benchmarks.study.study import StudyRuns, StudySettings
    from rank1_local.core.config import ScoringConfig
    from rank1_local.runs.inputs import PairRow

    source = folder / "behaving-0123456789ab"
    source.mkdir(parents=True)
    (source / "fixture.json").write_text("{}")
    runs = folder / "runs"
    runs.mkdir()
    keys = [(q, d) for q, docs in PASSAGES.items() for d in docs]
    ref_scores = dict(zip(keys, SCORES))
    ref_chains = {(q, d): _chain(q, d, _verdict(q, d)) for q, d in keys}
    ref_chains[FLIPS[1]] = f"{INJECTED} {ref_chains[FLIPS[1]]} {INJECTED}"  # before and after the divergence
    q2k_scores = ref_scores | {FLIPS[0]: 0.31, FLIPS[1]: 0.42, FORCED: 0.2, ("apple", "cherry"): 0.38}
    q2k_chains = dict(ref_chains)
    q2k_chains[FLIPS[0]] = _chain("apple", "lemon", "Different topics.")
    q2k_chains[FLIPS[1]] = ref_chains[FLIPS[1]].replace("(animal). Same", "(animal), but not the same animal. Not")
    q2k_chains[FORCED] = _chain("zinc", "cherry", "Wait, the passage is about the cherry, which is")
    settings = {"max_think_tokens": 64, "n_ctx": 512, "protocol": "official"}
    files = {"reference": runs / "reference-transformers-float32.jsonl", "Q8_0": runs / "Q8_0.jsonl",
             "Q2_K": runs / "Q2_K.jsonl"}
    files["reference"].write_text(_rows(ref_scores, ref_chains, set(), 24))
    files["Q8_0"].write_text(_rows({k: s + (0.004 if s < 0.5 else -0.004) for k, s in ref_scores.items()},
                                   ref_chains, set(), 24))
    files["Q2_K"].write_text(_rows(q2k_scores, q2k_chains, {FORCED}, 24))
    _header(files["reference"], str(source), "transformers", "transformers cpu float32", settings)
    for label in ("Q8_0", "Q2_K"):
        export = folder / f"{label}.gguf"
        export.write_bytes(b"GGUF" + bytes(1000 if label == "Q8_0" else 600))
        _header(files[label], str(export), "llama.cpp", "CPU", settings)
    qrels = {q: {d: 2 if q == d else int(CATEGORY[q] == CATEGORY[d]) for d in docs} for q, docs in PASSAGES.items()}
    qrels_file = folder / "qrels.txt"
    qrels_file.write_text("".join(f"{q} 0 {d} {g}\n" for q, docs in qrels.items() for d, g in docs.items()))
    inputs = StudyInputs([PairRow(q, f"What is known about the <{q}>?", d,
                                  f"This passage describes the {d} in some detail.") for q, d in keys],
                         qrels, "hand-written run files")
    study_settings = StudySettings(model=str(source), types=parse_study_types("Q8_0,Q2_K"),
                                   config=ScoringConfig(max_think_tokens=64, n_ctx=512), work=folder,
                                   out=folder / "out", reference="transformers", title="A study of hand-written runs",
                                   progress=False)
    study_runs = StudyRuns(folder / "pairs.jsonl", qrels_file, files["reference"], {"Q8_0": files["Q8_0"],
                           "Q2_K": files["Q2_K"]}, {"Q8_0": folder / "Q8_0.gguf", "Q2_K": folder / "Q2_K.gguf"},
                           source, 1.0)
    report = analyse_study(study_runs, inputs, study_settings, tokenize=str.split)
    write_report(report, folder / "out")
    return folder / "out" / "study.html", {"reference": ref_chains, "Q2_K": q2k_chains}


def page_pairs(page: Path, section: int = 0) -> dict:
    """The pair explorer's data of a report page, as the page's script reads it."""
    text = page.read_text(encoding="utf-8")
    start = text.index(f'<script type="application/json" id="pairs-{section}">')
    start = text.index(">", start) + 1
    return json.loads(text[start:text.index("</script>", start)])


def artifacts_folder(request, tmp_path_factory) -> Path:
    """Where the screenshots go: $RANK1_BROWSER_ARTIFACTS, else a folder of this session's temporary files; printed."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path_factory.getbasetemp() / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"browser screenshots: {folder}")
    return folder
