"""`rank1-bench study` end to end on the quantization test bed (the behaving-outliers fixture), its resume after a
kill mid-type, and the test bed itself. The test bed is a test of our machinery, not a model of real rank1
checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quant_study import study_pairs

ROOT = Path(__file__).resolve().parents[1]
BUDGET, N_CTX = 64, 512


def write_pairs(folder: Path, n_queries: int) -> tuple[Path, Path]:
    """The synthetic study pairs of the first ``n_queries`` query words (8 passages each) and their graded qrels."""
    from benchmarks.quant_study import relevance

    words = list(dict.fromkeys(p.query_word for p in study_pairs()))[:n_queries]
    pairs = [p for p in study_pairs() if p.query_word in words]
    folder.mkdir(parents=True, exist_ok=True)
    pairs_file, qrels_file = folder / "pairs.jsonl", folder / "qrels.txt"
    pairs_file.write_text("".join(json.dumps({"qid": p.query_word, "query": p.query, "docid": p.passage_word,
                                              "text": p.passage}) + "\n" for p in pairs))
    qrels_file.write_text("".join(f"{p.query_word} 0 {p.passage_word} {relevance(p)}\n" for p in pairs))
    return pairs_file, qrels_file


def study_command(model: Path, pairs: Path, qrels: Path, work: Path, out: Path, types: str,
                  *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.cli", "-q", "study", "--model", str(model), "--types", types,
            "--pairs", str(pairs), "--qrels", str(qrels), "--reference", "transformers", "--max-think-tokens",
            str(BUDGET), "--n-ctx", str(N_CTX), "--threads", "2", "--work", str(work), "--out", str(out), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_the_test_bed_behaves_and_has_outliers(fixture_dir):
    """Same function as `behaving` (its build checks the behaviour), heavy-tailed weights, and the channels whose
    activations were made 8x larger are what an importance matrix weighs most (its largest column is one of them, and
    each of them weighs far more than a typical column)."""
    from quantize.gguf_export import load_checkpoint, plan_export
    from quantize.imatrix import compute_imatrix

    folder = fixture_dir("behaving-outliers")
    info = json.loads((folder / "fixture.json").read_text())
    assert info["behaviour"]["exact_reasoning"] >= 0.95
    assert info["weight_kurtosis"]["median"] > 10 * info["weight_kurtosis"]["base_median"]
    names = {j.entry.name: j.gguf_name for j in plan_export(load_checkpoint(folder)).jobs if j.entry is not None}
    texts = [p.query + " " + p.passage for p in study_pairs()[:6]]
    imatrix = compute_imatrix(folder, texts, gguf_names=names, progress=False)
    for layer in range(3):
        for norm, tensor in (("input_layernorm", "attn_q"), ("post_attention_layernorm", "ffn_up")):
            massive = info["massive_channels"][f"model.layers.{layer}.{norm}"]
            mean = imatrix.entries[f"blk.{layer}.{tensor}.weight"].mean()
            assert int(mean.argmax()) in massive and mean[massive].min() > 5 * float(np.median(mean))


@pytest.fixture(scope="module")
def studied(fixture_dir, tmp_path_factory):
    """The study of Q8_0 and Q2_K on 6 queries (48 pairs) of the test bed, reference transformers fp32."""
    pytest.importorskip("scipy")
    model = fixture_dir("behaving-outliers")
    tmp = tmp_path_factory.mktemp("study")
    pairs, qrels = write_pairs(tmp / "in", 6)
    cmd = study_command(model, pairs, qrels, tmp / "work", tmp / "out", "Q8_0,Q2_K")
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT)
    return cmd, tmp


def test_study_end_to_end_on_the_test_bed(studied):
    """The report is written, and Q2_K is measurably worse than Q8_0."""
    _, tmp = studied
    out = tmp / "out"
    report = json.loads((out / "study.json").read_text())
    assert (out / "study.png").stat().st_size > 1000 and "## Order of damage" in (out / "study.md").read_text()
    q8, q2 = report["types"]
    assert (q8["label"], q2["label"]) == ("Q8_0", "Q2_K") and q8["common"] == q2["common"] == 48
    assert q8["flip_count"] <= 2 and q8["kl_mean"]["value"] < 1e-3
    assert q2["kl_mean"]["value"] > 10 * q8["kl_mean"]["value"] and q2["flip_count"] > q8["flip_count"]
    assert report["reference"]["backend"] == "transformers" and report["reference"]["quality"]["queries"] == 6
    (order,) = report["order"]
    assert order["first"] == "Q8_0" and order["second"] == "Q2_K" and order["abs_diff"]["value"] > 0
    assert q8["cost"]["peak_rss_bytes"] > 0 and q8["cost"]["pairs_per_second"] > 0


def test_the_study_writes_study_html_with_every_pair(studied):
    """study.html holds each type's pairs with both chains, as the run files have them, and its flips."""
    from browser_support import page_pairs

    from benchmarks.runfile import read_run

    _, tmp = studied
    data = page_pairs(tmp / "out" / "study.html")
    report = json.loads((tmp / "out" / "study.json").read_text())
    (ref_file,) = (tmp / "work" / "runs").glob("reference-*.jsonl")
    ref = read_run(ref_file)
    for run, stats in zip(data["runs"], report["types"]):
        rows = read_run(tmp / "work" / "runs" / f"{run['label']}.jsonl").rows
        assert run["label"] == stats["label"] and run["flips"] == stats["flip_count"] and run["total"] == 48
        for p in run["pairs"]:
            key = (p["q"], p["d"])
            assert data["strings"][p["ra"]] == ref.rows[key].reasoning
            assert data["strings"][p["rb"]] == rows[key].reasoning and p["b"] == rows[key].score


@pytest.mark.browser
def test_the_studys_html_shows_a_flipped_pairs_two_chains_offline(studied, browser, artifacts):
    """`rank1-bench study … --out OUT`: OUT/study.html opened from disk shows a flipped Q2_K pair's two chains."""
    from browser_support import by_css, console_errors, one, open_page
    from selenium.webdriver.support.ui import Select

    from benchmarks.runfile import read_run

    _, tmp = studied
    (ref_file,) = (tmp / "work" / "runs").glob("reference-*.jsonl")
    ref, q2 = read_run(ref_file), read_run(tmp / "work" / "runs" / "Q2_K.jsonl")
    open_page(browser, (tmp / "out" / "study.html").as_uri())
    Select(one(browser, ".explorer select.run")).select_by_index(1)  # Q2_K
    one(browser, '.explorer input[value="flips"]').click()
    rows = by_css(browser, ".explorer tbody tr")
    assert rows
    key = (rows[0].get_attribute("data-qid"), rows[0].get_attribute("data-docid"))
    assert (ref.rows[key].score > 0.5) != (q2.rows[key].score > 0.5)
    rows[0].click()
    assert one(browser, ".detail pre.chain.reference").get_attribute("textContent") == ref.rows[key].reasoning
    assert one(browser, ".detail pre.chain.run").get_attribute("textContent") == q2.rows[key].reasoning
    browser.execute_script("arguments[0].scrollIntoView()", one(browser, ".explorer"))
    browser.save_screenshot(str(artifacts / "study-fixture.png"))
    assert console_errors(browser) == []


def test_a_study_killed_mid_type_resumes_without_scoring_anything_twice(studied, tmp_path):
    """A copy of the finished study without its Q2_K run, killed while scoring Q2_K and started again: nothing that
    was done (exports, the reference, the Q2_K rows already written) is done again."""
    from rank1_local.runs.inputs import done_keys
    from rank1_local.runs.run_header import header_path, read_header

    cmd, tmp = studied
    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work)
    for stale in (work / "runs").glob("Q2_K.*"):
        stale.unlink()
    # the copy's exports have other paths, and a run file is tied to the export it was made with: only Q2_K is run
    swap = {str(tmp / "work"): str(work), str(tmp / "out"): str(tmp_path / "out"), "Q8_0,Q2_K": "Q2_K"}
    cmd = [swap.get(a, a) for a in cmd] + ["--parallel", "1"]
    run_file = work / "runs" / "Q2_K.jsonl"
    finished = {p: p.read_bytes() for p in (work / "runs").glob("*.jsonl")} | {
        p: p.stat().st_mtime_ns for p in (work / "exports").rglob("*.gguf")}
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not (run_file.exists() and len(run_file.read_text().splitlines()) >= 5):
            assert proc.poll() is None, f"the study ended before it could be killed: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its scoring process, mid-type
    finally:
        proc.wait()
    before = len(done_keys(run_file))  # complete rows (a row torn by the kill is dropped on resume)
    assert 5 <= before < 48
    kept = run_file.read_text().splitlines()[:before]
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, stderr=subprocess.DEVNULL)
    lines = run_file.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len({(r["qid"], r["docid"]) for r in rows}) == 48
    assert lines[:before] == kept  # the second session kept the first one's rows and scored only the rest
    assert read_header(header_path(run_file)).pairs == 48  # a header's pairs is the file's row count
    assert finished == {p: p.read_bytes() for p in finished if p.suffix == ".jsonl"} | {
        p: p.stat().st_mtime_ns for p in finished if p.suffix == ".gguf"}  # reference and exports untouched
    assert json.loads((tmp_path / "out" / "study.json").read_text())["types"][0]["common"] == 48


def test_an_mteb_reranking_task_as_study_inputs():
    """An MTEB reranking task (a local one: 12 judged TREC RAG 2024 pairs) gives its top-ranked documents per query,
    as mteb hands them to a cross-encoder, with the task's qrels."""
    pytest.importorskip("mteb")
    from test_mteb import _local_task

    from benchmarks.study.inputs import from_mteb

    task, rows = _local_task()
    got = from_mteb(task)
    assert [(p.qid, p.docid, p.query, p.text) for p in got.pairs] == \
        [(r["qid"], r["docid"], r["query"], r["text"]) for r in rows]
    assert got.qrels == {q: {r["docid"]: r["label"] for r in rows if r["qid"] == q} for q in got.queries}
    assert got.dataset == "TrecRag24Sample" and from_mteb(task, depth=2).pairs == \
        [p for p in got.pairs if p.docid in {r["docid"] for r in rows[:2] + rows[4:6] + rows[8:10]}]


@pytest.mark.ray
def test_a_study_on_ray_scores_as_the_local_one(studied, ray_cluster, tmp_path):
    """`--ray`: the same study with its scoring jobs on a local Ray cluster (2 workers, the reference included) gives
    the local study's runs: every pair once, the same decisions and reasoning, scores within llama.cpp's batch noise."""
    from benchmarks.runfile import read_run

    cmd, tmp = studied
    swap = {str(tmp / "work"): str(tmp_path / "work"), str(tmp / "out"): str(tmp_path / "out"), "Q8_0,Q2_K": "Q8_0"}
    subprocess.run([swap.get(a, a) for a in cmd] + ["--ray", ray_cluster, "--workers", "2"], check=True, env=env(),
                   cwd=ROOT)
    for name in ("reference-transformers-auto", "Q8_0"):
        local, on_ray = (read_run(w / "runs" / f"{name}.jsonl") for w in (tmp / "work", tmp_path / "work"))
        assert set(on_ray.rows) == set(local.rows) and len(on_ray.rows) == 48
        for key, row in on_ray.rows.items():
            assert abs(row.score - local.rows[key].score) <= 2e-3 and row.reasoning == local.rows[key].reasoning
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert report["types"][0]["label"] == "Q8_0" and report["types"][0]["common"] == 48


# -- issue 33: a Qwen3-Reranker study ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_studied(fixture_dir, tmp_path_factory):
    """The study of F16, Q8_0 and Q4_K_M+imatrix on 4 queries (32 pairs) of the qwen3-reranker-behaving fixture, in a
    folder whose name says nothing (``--card qwen3-reranker`` decides), the reference left to the study."""
    pytest.importorskip("scipy")
    tmp = tmp_path_factory.mktemp("qwen3-study")
    model = tmp / "my-model"
    model.mkdir()
    for f in fixture_dir("qwen3-reranker-behaving").iterdir():
        if f.name != "fixture.json":
            (model / f.name).symlink_to(f)
    pairs, qrels = write_pairs(tmp / "in", 4)
    cmd = [sys.executable, "-m", "benchmarks.cli", "-q", "study", "--model", str(model), "--card", "qwen3-reranker",
           "--types", "F16,Q8_0,Q4_K_M+imatrix", "--pairs", str(pairs), "--qrels", str(qrels), "--max-think-tokens",
           str(BUDGET), "--n-ctx", str(N_CTX), "--threads", "2", "--work", str(tmp / "work"), "--out",
           str(tmp / "out")]
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT)
    return cmd, tmp


def test_a_qwen3_reranker_study_end_to_end(qwen3_studied, fixture_dir):
    """The card goes through every step: the reference is transformers fp32 scoring as the model card's own code does
    (the independent re-typing, within 1e-3), the exports carry the rerank head and an importance matrix over the
    card's prompts, every run is scored under the card, and the table is sensible: F16 and Q8_0 keep every decision
    within a few thousandths."""
    from qwen3_reranker_reference import Qwen3RerankerReference

    from benchmarks.runfile import read_run
    from quantize.imatrix import read_imatrix
    from rank1_local.models.gguf_file import read_gguf_layout

    _, tmp = qwen3_studied
    work, out = tmp / "work", tmp / "out"
    report = json.loads((out / "study.json").read_text())
    assert report["settings"]["card"] == "qwen3-reranker" and report["reference"]["backend"] == "transformers"
    (ref_file,) = (work / "runs").glob("reference-*.jsonl")
    ref = read_run(ref_file).rows
    pairs = [json.loads(line) for line in (tmp / "in" / "pairs.jsonl").read_text().splitlines()]
    want = Qwen3RerankerReference(fixture_dir("qwen3-reranker-behaving")).scores(
        [(p["query"], p["text"]) for p in pairs], None)
    assert max(abs(ref[(p["qid"], p["docid"])].score - w) for p, w in zip(pairs, want, strict=True)) <= 1e-3
    for run in (work / "runs").glob("*.header.json"):
        assert json.loads(run.read_text())["settings"]["card"] == "qwen3-reranker", run.name
    for gguf in (work / "exports").rglob("my-model-*.gguf"):
        assert read_gguf_layout(gguf).metadata["qwen3.pooling_type"] == 4, gguf.name  # llama-server's rerank head
    (matrix,) = (work / "exports" / "gguf-imatrix").glob("*.imatrix.gguf")
    assert read_imatrix(matrix).datasets[0].startswith("qwen3-reranker calibration: 32 pairs")
    types = {t["label"]: t for t in report["types"]}
    assert list(types) == ["F16", "Q8_0", "Q4_K_M+imatrix"] and all(t["common"] == 32 for t in types.values())
    for label in ("F16", "Q8_0"):
        assert types[label]["flip_count"] == 0 and types[label]["abs_diff_max"] < 0.02, label
    assert types["F16"]["kl_mean"]["value"] < 1e-6 and types["Q8_0"]["kl_mean"]["value"] < 1e-3
    assert types["Q4_K_M+imatrix"]["flip_count"] <= 2 and types["Q4_K_M+imatrix"]["spearman"]["value"] > 0.9
    assert report["reference"]["quality"]["queries"] == 4 and types["F16"]["ndcg10_delta"]["value"] == 0
    md = (out / "study.md").read_text()
    assert "Model card qwen3-reranker (no reasoning" in md and "## Cost" in md and "Reasoning and cost" not in md


@pytest.mark.ray
def test_a_qwen3_reranker_study_on_ray_scores_as_the_local_one(qwen3_studied, ray_cluster, tmp_path):
    """`--ray`: the workers score under the study's card too (the folder's name says nothing)."""
    from benchmarks.runfile import read_run

    cmd, tmp = qwen3_studied
    swap = {str(tmp / "work"): str(tmp_path / "work"), str(tmp / "out"): str(tmp_path / "out"),
            "F16,Q8_0,Q4_K_M+imatrix": "Q8_0"}
    subprocess.run([swap.get(a, a) for a in cmd] + ["--ray", ray_cluster, "--workers", "2"], check=True, env=env(),
                   cwd=ROOT)
    for name in ("reference-transformers-auto", "Q8_0"):
        local, on_ray = (read_run(w / "runs" / f"{name}.jsonl") for w in (tmp / "work", tmp_path / "work"))
        assert set(on_ray.rows) == set(local.rows) and len(on_ray.rows) == 32
        assert all(abs(row.score - local.rows[key].score) <= 2e-3 for key, row in on_ray.rows.items())
