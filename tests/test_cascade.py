"""The prefilter cascade (``--prefilter MODEL --keep N``): a fast reranker scores every document, rank1 reasons over
the best N, the rest keep the prefilter's order below them, each row says which stage scored it, and the kept
documents' scores are rank1's alone, exactly.

Quick tier: the composition itself (rank1_local.pipeline.cascade) over two scripted models (the scripted engine of
tests/fake_engine.py: no model files) — through the Python API, the server and a resumed run file. Full tier: the
qwen3-reranker-behaving fixture (a prefill reranker: it answers at the last prompt position, no decoding) in front of
the behaving rank1 fixture, from the command line, against each model run alone."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import pytest
from fake_engine import FakeEngine, scripted, scripted_rank1

from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import Pair
from rank1_local.core.reranker import PREFILTER_STAGE, ranked
from rank1_local.pipeline.cascade import Cascade

CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=512)
# per passage word: the prefilter's logit of " true" (its score is sigmoid of it) and rank1's
PREFILTER = {"apple": 3.0, "banana": 2.0, "cherry": 1.5, "grape": 1.0, "lemon": 0.5, "mango": -1.0, "horse": -2.0,
             "tiger": -3.0}
RANK1 = {"apple": -1.0, "banana": 2.5, "cherry": 0.2, "grape": 4.0, "lemon": -0.5, "mango": 5.0, "horse": 1.0,
         "tiger": 0.0}
DOCS = list(PREFILTER)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def engine(logits: dict[str, float]) -> FakeEngine:
    def answer(passage: str, generated: str) -> tuple[float, float]:
        return next(v for k, v in logits.items() if k in passage), 0.0
    return FakeEngine(scripted({}, default="\nHmm.</think>"), answer=answer)


def models(parallel: int = 2):
    return (scripted_rank1(engine(PREFILTER), parallel, CONFIG, model_path="prefilter.gguf"),
            scripted_rank1(engine(RANK1), parallel, CONFIG, model_path="rank1.gguf"))


def expected_order(keep: int) -> list[str]:
    kept = sorted(DOCS, key=lambda d: -PREFILTER[d])[:keep]
    rest = sorted(DOCS, key=lambda d: -PREFILTER[d])[keep:]
    return sorted(kept, key=lambda d: -RANK1[d]) + rest


@pytest.mark.quick
@pytest.mark.parametrize("keep", [1, 3, 8, 20])
def test_the_cascade_keeps_rank1s_scores_and_the_prefilters_order_below_the_cut(keep):
    """``rerank``: the prefilter's best ``keep`` by rank1's score, each with exactly rank1's score alone, then the
    others in the prefilter's order with the prefilter's score; each result names its stage."""
    prefilter, rank1 = models()
    alone = {d: r.score for d, r in zip(DOCS, rank1.score_pairs([Pair("q", d) for d in DOCS]))}
    first = {d: r.score for d, r in zip(DOCS, prefilter.score_pairs([Pair("q", d) for d in DOCS]))}
    with Cascade(prefilter, rank1, keep) as cascade:
        results = cascade.rerank("q", DOCS)
        ranking = cascade.rank("q", DOCS, top_k=3)
        predicted = cascade.predict([("q", d) for d in DOCS])
    assert [DOCS[r.index] for r in results] == expected_order(keep)
    n = min(keep, len(DOCS))
    assert [r.stage for r in results] == ["rank1"] * n + [PREFILTER_STAGE] * (len(DOCS) - n)
    for r in results:
        assert r.score == (alone if r.stage == "rank1" else first)[DOCS[r.index]]  # exactly: the stage's own
    assert [row["corpus_id"] for row in ranking] == [r.index for r in results[:3]]
    assert list(predicted) == [next(r.score for r in results if r.index == i) for i in range(len(DOCS))]
    assert prefilter.lifecycle.value == rank1.lifecycle.value == "closed"  # closing the cascade closes both


@pytest.mark.quick
def test_a_call_of_several_queries_is_cut_per_query():
    """Pairs of several queries in one call (a pairs file), interleaved, and one query asked with an instruction:
    each (query, instruction) is its own ranking, cut at ``keep``."""
    prefilter, rank1 = models(parallel=3)
    pairs = [Pair(q, d, instruction) for d in DOCS for q, instruction in (("q1", None), ("q2", None), ("q1", "i"))]
    with Cascade(prefilter, rank1, 2) as cascade:
        results = cascade.score_pairs(pairs)
    for query in (("q1", None), ("q2", None), ("q1", "i")):
        mine = [r for r, p in zip(results, pairs) if (p.query, p.instruction) == query]
        assert [pairs[r.index].passage for r in ranked(mine)] == expected_order(2)


@pytest.mark.quick
def test_leaving_a_cascades_results_early_cancels_both_stages():
    prefilter, rank1 = models(parallel=1)
    with Cascade(prefilter, rank1, 4) as cascade:
        ticket = cascade.engine.submit([Pair("q", d) for d in DOCS])
        for _ in ticket.results():
            break
        assert cascade.engine.prefilter.open_tickets == 0 and cascade.engine.reranker.open_tickets == 0
        assert [DOCS[r.index] for r in cascade.rerank("q", DOCS)] == expected_order(4)  # and it serves on


@pytest.mark.quick
def test_the_server_serves_a_cascade():
    """POST /v1/rerank on a cascade: the cascade's order, each row's stage; /v1/models names the prefilter."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from rank1_local.server.app import ServerSettings, create_app

    prefilter, rank1 = models()
    with Cascade(prefilter, rank1, 3) as cascade:
        app = create_app(cascade, ServerSettings(model_name="cascade"))

        async def scenario():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                plain = await client.post("/v1/rerank", json={"query": "q", "documents": DOCS})
                streamed = await client.post("/v1/rerank", json={"query": "q", "documents": DOCS, "stream": True,
                                                                 "top_n": 4})
                return plain, streamed, await client.get("/v1/models")

        plain, streamed, listed = asyncio.run(scenario())
    rows = plain.json()["results"]
    assert [DOCS[r["index"]] for r in rows] == expected_order(3)
    assert [r["stage"] for r in rows] == ["rank1"] * 3 + [PREFILTER_STAGE] * 5
    assert [r["relevance_score"] for r in rows[:3]] == \
        pytest.approx([sigmoid(RANK1[DOCS[r["index"]]]) for r in rows[:3]])
    done = json.loads(streamed.text.split("event: done\ndata: ")[1].split("\n")[0])
    assert [r["index"] for r in done["results"]] == [r["index"] for r in rows[:4]]
    meta = listed.json()["data"][0]["meta"]
    assert meta["prefilter"]["file"] == "prefilter.gguf" and meta["keep"] == 3


@pytest.mark.quick
@pytest.mark.parametrize("stage", ["prefilter", "rank1"])
def test_a_cascade_run_file_resumed_after_a_failure_holds_each_row_once(tmp_path, stage):
    """``rerank --pairs --prefilter``: a run that stops while the prefilter scores q2 (q1's rows below the cut are
    written), or while rank1 scores q2's kept documents (every row below the cut and q1's kept rows are written), is
    resumed by scoring only the pairs it lacks: they hold every kept pair of a query or only kept pairs, so the
    prefilter keeps the same ones. Nothing is scored by rank1 twice, and the file equals an uninterrupted run's."""
    from rank1_local.runs.run_file import score_pairs_file

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"qid": q, "query": q, "docid": d, "text": f"{q} {d}"}) + "\n"
                             for q in ("q1", "q2", "q3") for d in DOCS))
    asked: list[str] = []
    broken = [False]
    model_file = tmp_path / "rank1.gguf"  # a resumed run checks the file it was started with
    model_file.write_bytes(b"")

    def failing(scores: dict[str, float], when: str) -> FakeEngine:
        made = engine(scores)
        answer = made.answer

        def answer_or_fail(passage: str, generated: str) -> tuple[float, float]:
            if broken[0] and stage == when and passage.startswith("q2 banana"):
                time.sleep(0.5)  # the results before it reach the run file first
                raise RuntimeError("the machine went away")
            return answer(passage, generated)

        made.answer = answer_or_fail
        return made

    def cascade():
        prefilter = scripted_rank1(failing(PREFILTER, "prefilter"), 1, CONFIG, model_path="prefilter.gguf")
        rank1 = scripted_rank1(failing(RANK1, "rank1"), 1, CONFIG, model_path=model_file)
        submit = rank1.engine.submit
        rank1.engine.submit = lambda ps, config=None: (asked.extend(p.passage for p in ps),
                                                       submit(ps, config))[1]
        return Cascade(prefilter, rank1, 3)

    def run(out):
        return score_pairs_file(pairs, out, cascade, model_arg=str(model_file), backend="llama.cpp",
                                settings={**CONFIG.to_dict(), "prefilter": "prefilter.gguf", "keep": 3},
                                progress=False)

    whole = tmp_path / "whole.jsonl"
    assert run(whole) == 24
    kept = {f"{q} {d}" for q in ("q1", "q2", "q3") for d in expected_order(3)[:3]}
    assert set(asked) == kept and len(asked) == 9
    stopped = tmp_path / "stopped.jsonl"
    broken[0] = True
    asked.clear()
    with pytest.raises(Exception, match="the machine went away"):
        run(stopped)
    written = {(r["qid"], r["docid"]) for r in map(json.loads, stopped.read_text().splitlines())}
    # q1's rows below the cut; or every row below the cut, q1's kept rows and q2's first
    assert len(written) == (5 if stage == "prefilter" else 5 * 3 + 3 + 1)
    broken[0] = False
    asked.clear()
    assert run(stopped) == 24 - len(written)
    assert sorted(asked) == sorted(kept - {f"{q} {d}" for q, d in written})  # rank1: only the kept pairs left
    rows = [json.loads(line) for line in stopped.read_text().splitlines()]
    assert len(rows) == len({(r["qid"], r["docid"]) for r in rows}) == 24
    by_key = {(r["qid"], r["docid"]): r for r in rows}
    for line in whole.read_text().splitlines():
        row = json.loads(line)
        assert (by_key[(row["qid"], row["docid"])]["score"], by_key[(row["qid"], row["docid"])]["stage"]) == \
            (row["score"], row["stage"])


@pytest.mark.quick
@pytest.mark.parametrize("args, message", [
    (["--keep", "4"], "--keep goes with --prefilter"),
    (["--prefilter", "p.gguf"], "--prefilter needs --keep N"),
    (["--prefilter", "p.gguf", "--keep", "0"], "keep must be at least 1"),
    (["--prefilter", "p.gguf", "--keep", "2", "--ray", "local"], "--prefilter does not run on Ray"),
    (["--prefilter", "p.gguf", "--keep", "2", "--prefilter-card", "bert"], "no model card 'bert'"),
])
def test_bad_prefilter_flags_are_refused_before_anything_loads(tmp_path, capsys, args, message):
    from rank1_local.cli.main import main

    docs = tmp_path / "docs.txt"
    docs.write_text("a passage\n")
    assert main(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


# --- the fixtures: a prefilter in front of rank1 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_models(exported):
    """The behaving rank1 fixture (Q8_0) and, as the prefilter, the qwen3-reranker-behaving fixture (F16), trained on
    the same synthetic task in Qwen3-Reranker's prompt."""
    return exported("behaving", "Q8_0"), exported("qwen3-reranker-behaving", "F16")


def cli(*args: str, budget: int = 64, n_ctx: int = 512) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "-q", "rerank", *args, "--format", "json",
                          "--threads", "2", "--max-think-tokens", str(budget), "--n-ctx", str(n_ctx)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_rerank_with_a_prefilter_keeps_rank1s_scores_exactly(fixture_models, tmp_path):
    """``rank1-local rerank --prefilter P.gguf --keep 4`` over 12 documents: the kept 4 are the prefilter's best 4,
    ranked by rank1 with exactly the scores rank1 gives them alone (one pair at a time, --parallel 1: no batch
    shares them); the other 8 follow in the prefilter's order with the scores it gives alone (at the settings a
    prefilter gets: a budget of 1, the context rank1's prompt has), answered at once (no reasoning); each row names
    its stage. The prefilter's order is not rank1's: its best 4 are not rank1's best 4, so a cascade that kept
    rank1's best 4, or the prefilter's worst, would fail here."""
    from benchmarks.quant_study import study_pairs

    rank1, prefilter = fixture_models
    # the tiger query: the prefilter puts "truck" (another category) first, which rank1 scores 0
    pairs = [p for p in study_pairs() if p.query_word == "tiger"] + \
        [p for p in study_pairs() if p.query_word == "apple"][:4]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"docid": f"d{i}", "text": p.passage}) + "\n" for i, p in enumerate(pairs)))
    query = pairs[0].query
    common = ["--query", query, "--docs", str(docs), "--parallel", "1"]
    alone = {r["docid"]: r for r in cli("--model", str(rank1), *common)}
    first = cli("--model", str(prefilter), *common, budget=1, n_ctx=512 - 64)
    cascade = cli("--model", str(rank1), *common, "--prefilter", str(prefilter), "--keep", "4")
    kept_ids = {r["docid"] for r in first[:4]}
    assert kept_ids != {r["docid"] for r in list(alone.values())[:4]}  # rank1's own best 4 (its ranking's first)
    assert all(r["n_tokens"] == 0 and r["reasoning"] == "" for r in first)  # the prefilter answers at once
    assert {r["docid"] for r in cascade[:4]} == kept_ids
    assert [r["stage"] for r in cascade] == ["rank1"] * 4 + ["prefilter"] * (len(pairs) - 4)
    for row in cascade[:4]:
        assert (row["score"], row["reasoning"]) == (alone[row["docid"]]["score"], alone[row["docid"]]["reasoning"])
    assert [r["score"] for r in cascade[:4]] == sorted((r["score"] for r in cascade[:4]), reverse=True)
    assert [(r["docid"], r["score"]) for r in cascade[4:]] == [(r["docid"], r["score"]) for r in first[4:]]
