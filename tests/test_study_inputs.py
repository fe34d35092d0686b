"""Each study input on a small local example: pairs + qrels, a BEIR folder with a first-stage run, an ir_datasets
dataset read from a local copy, and the command's early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.study import inputs
from benchmarks.study.exports import parse_study_types
from rank1_local.core.dataset_prompts import DATASET_PROMPTS
from rank1_local.core.errors import Rank1Error

pytestmark = pytest.mark.quick
SAMPLE = Path(__file__).parent / "data" / "trec_rag24_sample.jsonl"


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def make_beir(folder: Path) -> tuple[Path, Path, dict]:
    """A BEIR folder from the TREC RAG 2024 sample (every other passage with a title, a query nobody judged, a
    passage the run never ranks) and a first-stage run that ranks each query's passages in reverse."""
    rows = sample_rows()
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": r["docid"], "title": f"Title {i}" if i % 2 else "", "text": r["text"]} for i, r in enumerate(rows)]
    corpus.append({"_id": "never-ranked", "title": "", "text": "unused"})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus), encoding="utf-8")
    queries = {r["qid"]: r["query"] for r in rows} | {"unjudged": "a query without judgments"}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                  for q, t in queries.items()), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{r['qid']}\t{r['docid']}\t{r['label']}\n" for r in rows))
    run = folder.parent / "bm25.trec"
    lines = []
    for qid in dict.fromkeys(r["qid"] for r in rows):
        docs = [r["docid"] for r in rows if r["qid"] == qid][::-1]
        lines += [f"{qid} Q0 {d} {rank} {10.0 - rank} bm25" for rank, d in enumerate(docs, 1)]
    lines.append(f"unjudged Q0 {rows[0]['docid']} 1 5.0 bm25")
    run.write_text("\n".join(lines) + "\n")
    return folder, run, {r["docid"]: r for r in rows}


def test_pairs_file_with_trec_and_beir_qrels(tmp_path):
    rows = sample_rows()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({k: r[k] for k in ("qid", "query", "docid", "text")}) + "\n" for r in rows))
    trec = tmp_path / "qrels.txt"
    trec.write_text("".join(f"{r['qid']} 0 {r['docid']} {r['label']}\n" for r in rows))
    beir = tmp_path / "qrels.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r['qid']}\t{r['docid']}\t{r['label']}\n" for r in rows))
    a, b = inputs.from_pairs_file(pairs, trec), inputs.from_pairs_file(pairs, beir)
    assert a.qrels == b.qrels and a.qrels["2024-105741"][rows[0]["docid"]] == 3
    assert [p.docid for p in a.pairs] == [r["docid"] for r in rows] and a.queries == list(dict.fromkeys(
        r["qid"] for r in rows))
    assert inputs.from_pairs_file(pairs).qrels is None


def test_beir_folder_with_a_first_stage_run(tmp_path):
    folder, run, by_id = make_beir(tmp_path / "tiny")
    got = inputs.from_beir(folder, run, depth=3)
    assert got.queries == ["2024-105741", "2024-121840", "2024-127266"]  # the unjudged query is left out
    for qid in got.queries:
        ranked = [r["docid"] for r in sample_rows() if r["qid"] == qid][::-1][:3]  # reverse order, depth 3
        assert [p.docid for p in got.pairs if p.qid == qid] == ranked
    pair = got.pairs[0]
    assert pair.text == by_id[pair.docid]["text"] and pair.query == by_id[pair.docid]["query"]
    titled = [p for p in got.pairs if p.title]
    assert titled and all(p.passage == {"title": p.title, "text": p.text} for p in titled)
    assert got.qrels["2024-127266"] == {r["docid"]: r["label"] for r in sample_rows() if r["qid"] == "2024-127266"}
    assert got.dataset is None  # "tiny" is no dataset the official evaluation knows


def test_beir_name_picks_the_official_dataset_prompt(tmp_path):
    folder, run, _ = make_beir(tmp_path / "scifact")
    got = inputs.from_beir(folder, run, depth=2)
    assert got.dataset == "SciFact" and "SciFact" in DATASET_PROMPTS


def test_run_with_documents_the_corpus_lacks_is_an_error(tmp_path):
    folder, run, _ = make_beir(tmp_path / "tiny")
    with open(run, "a") as f:
        f.write("2024-105741 Q0 ghost-doc 0 99.0 bm25\n")
    with pytest.raises(Rank1Error, match="ghost-doc"):
        inputs.from_beir(folder, run, depth=3)


@pytest.mark.parametrize("line, message", [("q1 Q0 d1 1 0.5", "got 5 columns"), ("q1 Q0 d1 one 0.5 t", "integer"),
                                          ("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t", "ranked twice")])
def test_bad_run_files(tmp_path, line, message):
    run = tmp_path / "run.trec"
    run.write_text(line + "\n")
    with pytest.raises(Rank1Error, match=message):
        inputs.read_trec_run(run, 10)


def test_qrels_errors(tmp_path):
    bad = tmp_path / "q.txt"
    bad.write_text("q1 0 d1 high\n")
    with pytest.raises(Rank1Error, match="integer"):
        inputs.read_qrels(bad)
    bad.write_text("q1 d1\n")
    with pytest.raises(Rank1Error, match="columns"):
        inputs.read_qrels(bad)


def test_ir_datasets_from_a_local_copy(tmp_path, monkeypatch):
    """An ir_datasets dataset made of ir_datasets' own BEIR readers over local files (as `beir/scifact` is, once
    downloaded), with the first stage from its scoreddocs and, alternatively, from a run file."""
    ir_datasets = pytest.importorskip("ir_datasets")
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.datasets.beir import BeirDocs, BeirQrels, BeirQueries, BeirTitleDoc
    from ir_datasets.formats import GenericQuery, TrecScoredDocs
    from ir_datasets.util import LocalDownload

    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "home"))
    folder, run, _ = make_beir(tmp_path / "tiny")
    name = f"rank1-local-test-{tmp_path.name}"
    dataset = Dataset(BeirDocs(name, LocalDownload(folder / "corpus.jsonl"), BeirTitleDoc),
                      BeirQueries(name, LocalDownload(folder / "queries.jsonl"), GenericQuery),
                      BeirQrels(LocalDownload(folder / "qrels" / "test.tsv"), {}),
                      TrecScoredDocs(LocalDownload(run)))
    ir_datasets.registry.register(name, dataset)
    got = inputs.from_ir_datasets(name, depth=3)
    expected = inputs.from_beir(folder, run, depth=3)
    assert [(p.qid, p.docid, p.query, p.text, p.title) for p in got.pairs] == \
        [(p.qid, p.docid, p.query, p.text, p.title) for p in expected.pairs]
    assert got.qrels == expected.qrels
    shorter = tmp_path / "short.trec"
    shorter.write_text("\n".join(run.read_text().splitlines()[:2]) + "\n")
    assert [p.docid for p in inputs.from_ir_datasets(name, shorter, depth=3).pairs] == \
        [p.docid for p in expected.pairs[:2]]
    with pytest.raises(Rank1Error, match="does not know"):
        inputs.from_ir_datasets("no-such/dataset-id")


def test_written_inputs_are_stable(tmp_path):
    folder, run, _ = make_beir(tmp_path / "tiny")
    got = inputs.from_beir(folder, run, depth=3)
    first = inputs.write_inputs(got, tmp_path / "work")
    mtime = first.pairs_file.stat().st_mtime_ns
    again = inputs.write_inputs(inputs.from_beir(folder, run, depth=3), tmp_path / "work")
    assert again.digest == first.digest and first.pairs_file.stat().st_mtime_ns == mtime
    fields = [(p.qid, p.query, p.docid, p.text, p.title, p.instruction) for p in got.pairs]
    assert [(p.qid, p.query, p.docid, p.text, p.title, p.instruction)
            for p in inputs.from_pairs_file(first.pairs_file, first.qrels_file).pairs] == fields  # it reads back
    assert inputs.write_inputs(inputs.from_beir(folder, run, depth=2), tmp_path / "w2").digest != first.digest


def test_study_types():
    types = parse_study_types("f16, Q4_K_M,q4_k_m+imatrix,IQ2_M+imatrix")
    assert [t.label for t in types] == ["F16", "Q4_K_M", "Q4_K_M+imatrix", "IQ2_M+imatrix"]
    assert types[2].imatrix and types[2].gguf_type == "Q4_K_M" and not types[1].imatrix
    for spec, message in (("Q4_K_X", "unknown GGUF"), ("F16+imatrix", "written directly"),
                          ("IQ2_M", "only with an importance matrix"), ("Q8_0,Q8_0", "twice"),
                          ("awq-8bit", "supports 4 bits"), ("", "no types")):
        with pytest.raises(Rank1Error, match=message):
            parse_study_types(spec)


@pytest.mark.parametrize("args, message", [
    (["--types", "Q4_K_X"], "unknown GGUF type"),
    (["--workers", "2"], "--workers needs --ray"),
    (["--beir", "{tmp}/tiny"], "--beir needs --run"),
    (["--pairs", "{tmp}/missing.jsonl"], "no such file"),
    (["--pairs", "{tmp}/pairs.jsonl", "--run", "{tmp}/r.trec"], "--run goes with"),
    (["--pairs", "{tmp}/pairs.jsonl", "--reference", "vllm", "--vllm-python", "{tmp}/nopython"], "no such Python"),
    (["--budgets", "8,4096", "--n-ctx", "2048"], r"n_ctx (2048) leaves no room"),
    (["--budgets", "8,0"], "values must be at least 1"),
    (["--budgets", "8,64", "--rethink-rounds", "1"], "cannot go with rethink_rounds"),
    (["--keep", "4"], "--keep goes with --prefilter"),
    (["--prefilter", "{tmp}/p.gguf"], "--prefilter needs --keep"),
    (["--prefilter", "{tmp}/p.gguf", "--keep", "0"], "values must be at least 1"),
    (["--target-latency", "0"], "--target-latency must be more than 0"),
    (["--target-latency", "2"], "--target-latency picks the point with the best nDCG@10, which needs qrels"),
    (["--budgets", "8,64", "--ray", "local"], "--budgets and --prefilter do not run on Ray"),
    (["--budgets", "8,64", "--types", "gptq-4bit", "--weight-quant-backend", "vllm"], "GPTQ/AWQ types with --budgets"),
    (["--card", "bge"], "no model card 'bge'; the cards are: rank1"),
    (["--card", "qwen3-reranker", "--budgets", "8,64"], "--budgets maps reasoning budgets, but the qwen3-reranker card "
                                                       "does not reason"),
    (["--model", "Qwen/Qwen3-Reranker-0.6B", "--budgets", "8,64"], "the qwen3-reranker card does not reason"),
    (["--card", "qwen3-reranker", "--reference", "vllm"], "--reference vllm: the vLLM backend runs rank1's official "
                                                         "flow only, not the qwen3-reranker card"),
    (["--card", "qwen3-reranker", "--types", "gptq-4bit", "--weight-quant-backend", "vllm"],
     "GPTQ/AWQ types run on --weight-quant-backend transformers"),
])
def test_study_errors_are_one_line_and_early(tmp_path, capsys, args, message):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "y"}) + "\n")
    base = ["study", "--model", str(tmp_path / "no-model"), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    if not any(a in args for a in ("--pairs", "--beir")):
        base += ["--pairs", str(tmp_path / "pairs.jsonl")]
    assert main(base + [a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()  # refused before anything was written


@pytest.mark.parametrize("part, change, message", [
    ("corpus.jsonl", {"text": None}, r"corpus.jsonl:1: text must be a string, got null"),
    ("corpus.jsonl", {"title": 5}, r"corpus.jsonl:1: title must be a string, got 5"),
    ("queries.jsonl", {"text": {"q": "a dict"}}, r"queries.jsonl:1: text must be a string, got \{"),
    ("queries.jsonl", {"_id": None}, r"queries.jsonl:1: _id must be a non-empty string or an integer"),
])
def test_beir_rows_of_the_wrong_type_name_their_line(tmp_path, part, change, message):
    """Never "None" or a dict's repr scored as text."""
    folder, run, _ = make_beir(tmp_path / "tiny")
    path = folder / part
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[0] = json.dumps(json.loads(lines[0]) | change)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(Rank1Error, match=message):
        inputs.from_beir(folder, run, depth=100)


@pytest.mark.parametrize("flag", ["--work", "--out"])
def test_work_and_out_that_are_files_are_refused_before_anything_runs(tmp_path, capsys, flag):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}) + "\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    folders = {"--work": str(tmp_path / "work"), "--out": str(tmp_path / "out"), flag: str(a_file)}
    argv = ["study", "--model", str(tmp_path / "no-model"), "--pairs", str(pairs), "--types", "Q8_0",
            "--reference", "transformers", "--work", folders["--work"], "--out", folders["--out"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is a file; {flag} is a folder" in err and "Traceback" not in err
    assert a_file.read_text() == "kept" and not (tmp_path / "work").exists()


def test_the_reference_engine_is_checked_before_anything_else(tmp_path, capsys, caplog):
    """Without vLLM, `--reference vllm` is refused before the inputs are read or anything exported, naming the study's
    own flags; left out, the reference is transformers, and the study says so."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this Python")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "y"}) + "\n")
    base = ["study", "--model", str(tmp_path / "no-model"), "--pairs", str(tmp_path / "pairs.jsonl"), "--work",
            str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--types", "Q8_0"]
    assert main(base + ["--reference", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--reference vllm: vLLM is not installed in this Python" in err and "--reference transformers" in err
    assert "--backend" not in err and not (tmp_path / "w").exists()
    assert main(base) == 2  # now the missing model: the engine was fine
    err = capsys.readouterr().err
    assert "no-model" in err and "vLLM is not installed in this Python" not in err
    assert "vLLM is not installed here: the reference is transformers" in caplog.text


def test_a_failed_scoring_job_says_whether_rows_were_kept(tmp_path):
    from benchmarks.study.scoring import ScoringJob, subprocess_scorer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "y"}) + "\n")
    job = ScoringJob("Q8_0", "llama.cpp", str(tmp_path / "missing.gguf"), {}, {}, str(pairs),
                     str(tmp_path / "runs" / "Q8_0.jsonl"), progress=False)
    (tmp_path / "runs").mkdir()
    with pytest.raises(Rank1Error, match="no row was written") as failed:
        subprocess_scorer(job)
    assert "kept" not in str(failed.value)
