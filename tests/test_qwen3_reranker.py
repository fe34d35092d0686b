"""The qwen3-reranker-behaving fixture, judged by an independent re-typing of the official model card's code
(tests/qwen3_reranker_reference.py), and its GGUF exports run by llama.cpp: ours and llama.cpp's own converter's,
read directly (the last position's "yes"/"no" logits) and through ``llama-server --reranking`` (the rerank head).

Scores are P("yes") / (P("yes") + P("no")) at the last prompt position, compared in float32 within 1e-3.
"""

from __future__ import annotations

import math

import pytest

from quantize.fixtures.synthetic_task import eval_pairs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen3_reranker_reference import (  # noqa: E402  (after the importorskip of torch/transformers)
    PREFIX,
    SUFFIX,
    Qwen3RerankerReference,
    format_instruction,
)

FIXTURE = "qwen3-reranker-behaving"
YES, NO = 9693, 2152  # the Qwen2/Qwen3 vocabulary's "yes" and "no"
TOLERANCE = 1e-3
OTHER_INSTRUCTION = "Given a question about a topic, find the passages about that same topic"  # trained as well


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return Qwen3RerankerReference(fixture_dir(FIXTURE))


@pytest.fixture(scope="module")
def pairs():
    return eval_pairs()


@pytest.fixture(scope="module")
def reference_scores(reference, pairs):
    """instruction (None: the card's default) -> the reference's score of every evaluation pair."""
    return {instruction: reference.scores([(p.query, p.passage) for p in pairs], instruction)
            for instruction in (None, OTHER_INSTRUCTION)}


def test_the_reference_reads_the_card_as_written(reference):
    assert (reference.token_true_id, reference.token_false_id) == (YES, NO)
    ids = reference.input_ids("What is known about the apple?", "This passage describes the apple in some detail.")
    text = reference.tokenizer.decode(ids)
    assert text == PREFIX + format_instruction(None, "What is known about the apple?",
                                               "This passage describes the apple in some detail.") + SUFFIX
    assert ids[-4:] == [151667, 271, 151668, 271]  # "<think>", "\n\n", "</think>", "\n\n"


@pytest.mark.parametrize("instruction", [None, OTHER_INSTRUCTION], ids=["default-instruction", "other-instruction"])
def test_the_fixture_separates_the_topics(pairs, reference_scores, instruction):
    """By the card's own code, under either instruction, the fixture scores each query's same-word passage above its
    other-category one (nine queries in ten at least), and same-word pairs well above other-category ones on average:
    its scores carry the task, so the rankings compared below have something to rank."""
    scores = reference_scores[instruction]
    by_query: dict[str, dict[str, float]] = {}
    for pair, score in zip(pairs, scores, strict=True):
        by_query.setdefault(pair.query, {})[pair.kind] = score
    assert sum(q["same"] > q["different"] for q in by_query.values()) >= 0.9 * len(by_query)
    same = [s for p, s in zip(pairs, scores, strict=True) if p.kind == "same"]
    different = [s for p, s in zip(pairs, scores, strict=True) if p.kind == "different"]
    assert sum(same) / len(same) - sum(different) / len(different) >= 0.3


def _llama_cpp_scores(gguf, reference, pairs, instruction):
    """Each pair's prompt tokenized by llama.cpp (as llama-server does: one string, special tokens parsed), checked
    against the card's ids, evaluated, and scored from the last position's logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    scores = []
    try:
        for pair in pairs:
            text = PREFIX + format_instruction(instruction, pair.query, pair.passage) + SUFFIX
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == reference.input_ids(pair.query, pair.passage, instruction)
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            scores.append(1.0 / (1.0 + math.exp(logits[NO] - logits[YES])))
    finally:
        llm.close()
    return scores


@pytest.fixture(scope="module")
def llama_cpp_gguf(fixture_dir, exported, converted_by_llama_cpp):
    return {"ours": lambda: exported(FIXTURE, "F32"),
            "llama.cpp's converter": lambda: converted_by_llama_cpp(fixture_dir(FIXTURE), "f32")}


@pytest.mark.parametrize("source", ["ours", "llama.cpp's converter"])
@pytest.mark.parametrize("instruction", [None, OTHER_INSTRUCTION], ids=["default-instruction", "other-instruction"])
def test_llama_cpp_matches_the_reference(source, instruction, llama_cpp_gguf, reference, pairs, reference_scores):
    """The F32 GGUF, in llama.cpp, scores every pair within 1e-3 of the card's code, and ranks each query's passages
    the same."""
    got = _llama_cpp_scores(llama_cpp_gguf[source](), reference, pairs, instruction)
    want = reference_scores[instruction]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
    for query in {p.query for p in pairs}:
        rows = [i for i, p in enumerate(pairs) if p.query == query]
        assert sorted(rows, key=lambda i: -got[i]) == sorted(rows, key=lambda i: -want[i])


@pytest.mark.parametrize("source", ["ours", "llama.cpp's converter"])
def test_llama_server_reranks_like_the_reference(source, llama_cpp_gguf, pairs, reference_scores):
    """``llama-server --reranking`` (built from the same llama.cpp: python -m benchmarks.llama_server build) serves the
    GGUF's rerank head: its /v1/rerank scores equal the card's within 1e-3 (llama-server's prompt holds the card's
    default instruction)."""
    from benchmarks.llama_server import LlamaServer, built_server

    if built_server() is None:
        pytest.skip("llama-server is not built here: python -m benchmarks.llama_server build (compiles llama.cpp)")
    want = reference_scores[None]
    with LlamaServer(llama_cpp_gguf[source]()) as server:
        for query in sorted({p.query for p in pairs}):
            rows = [i for i, p in enumerate(pairs) if p.query == query]
            got = server.rerank(query, [pairs[i].passage for i in rows])
            assert max(abs(g - want[i]) for g, i in zip(got, rows, strict=True)) <= TOLERANCE, (query, got)


def _instructed(pairs, instruction):
    return [(p.query, p.passage) if instruction is None else (p.query, p.passage, instruction) for p in pairs]


def _assert_like_the_reference(got, want, pairs):
    """Every score within 1e-3 of the reference's, and each query's passages in the same order."""
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
    for query in {p.query for p in pairs}:
        rows = [i for i, p in enumerate(pairs) if p.query == query]
        assert sorted(rows, key=lambda i: -got[i]) == sorted(rows, key=lambda i: -want[i])


@pytest.mark.parametrize("source", ["ours", "llama.cpp's converter"])
@pytest.mark.parametrize("instruction", [None, OTHER_INSTRUCTION], ids=["default-instruction", "other-instruction"])
def test_rank1_local_scores_like_the_reference(source, instruction, llama_cpp_gguf, pairs, reference_scores):
    """Our llama.cpp backend, given the GGUF alone (no card named), recognises the qwen3-reranker card from the file
    and scores every pair, in its continuous batch, within 1e-3 of the card's code."""
    from rank1_local import open_reranker
    from rank1_local.core.cards import QWEN3_RERANKER

    with open_reranker("llama.cpp", llama_cpp_gguf[source](), threads=2, parallel=4) as reranker:
        assert reranker.card is QWEN3_RERANKER
        results = reranker.score_pairs(_instructed(pairs, instruction))
    assert all(r.n_tokens == 0 and r.reasoning == "" and not r.forced for r in results)  # the answer, at once
    _assert_like_the_reference([r.score for r in results], reference_scores[instruction], pairs)


def test_a_named_card_scores_a_plain_qwen3_like_the_reference(fixture_dir, exported, pairs):
    """``card="qwen3-reranker"`` on a Qwen3 GGUF that says nothing of reranking (the random qwen3 fixture, no rerank
    head): scored as the card's code scores those weights."""
    from rank1_local import open_reranker
    from rank1_local.core.cards import QWEN3_RERANKER, RANK1

    gguf = exported("qwen3", "F32")
    with open_reranker("llama.cpp", gguf, threads=2) as plain:
        assert plain.card is RANK1  # nothing in the file says reranker
    some = pairs[::5]
    want = Qwen3RerankerReference(fixture_dir("qwen3")).scores([(p.query, p.passage) for p in some], None)
    with open_reranker("llama.cpp", gguf, threads=2, card="qwen3-reranker") as reranker:
        assert reranker.card is QWEN3_RERANKER
        got = [r.score for r in reranker.score_pairs([(p.query, p.passage) for p in some])]
    _assert_like_the_reference(got, want, some)


def test_a_bundle_runs_under_the_card_its_manifest_records(fixture_dir, exported, pairs, tmp_path, monkeypatch):
    """``rank1-local pull GGUF --card qwen3-reranker`` on a plain Qwen3 GGUF (which alone is taken for rank1): the
    bundle runs under the recorded card with no ``--card`` given, scores like the card's code, and the run header
    says so."""
    import json

    from rank1_local.cli.main import main

    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    bundle = tmp_path / "qwen3-bundle"
    assert main(["-q", "pull", str(exported("qwen3", "F32")), "--card", "qwen3-reranker", "--out", str(bundle)]) == 0
    some = pairs[::5]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"qid": p.query, "query": p.query, "docid": str(i), "text": p.passage})
                                  + "\n" for i, p in enumerate(some)))
    out = tmp_path / "run.jsonl"
    assert main(["-q", "rerank", "--model", str(bundle), "--pairs", str(pairs_file), "--output", str(out),
                 "--threads", "2"]) == 0
    header = json.loads(out.with_name("run.header.json").read_text())
    assert header["settings"]["card"] == "qwen3-reranker"
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: int(r["docid"]))
    assert all(r["n_tokens"] == 0 and r["reasoning"] == "" for r in rows)  # read at once, no reasoning
    want = Qwen3RerankerReference(fixture_dir("qwen3")).scores([(p.query, p.passage) for p in some], None)
    _assert_like_the_reference([r["score"] for r in rows], want, some)


def test_a_ray_serve_replica_opens_its_model_under_the_card(exported, pairs):
    """A Ray Serve replica (the plain class Serve deploys, made here without a cluster) opens a plain Qwen3 GGUF under
    the spec's card, and serves the card's scores (``rank1-local serve --ray --card``)."""
    from rank1_local.backends.llama.facade import LlamaSettings
    from rank1_local.core.cards import QWEN3_RERANKER
    from rank1_local.core.config import ScoringConfig
    from rank1_local.integrations.ray_serve import Rank1Replica, ReplicaSpec

    gguf = exported("qwen3", "F32")
    replica = Rank1Replica(ReplicaSpec(str(gguf), ScoringConfig(), settings=LlamaSettings(threads=2),
                                       card="qwen3-reranker"))
    try:
        assert replica.model.card is QWEN3_RERANKER
        results = replica.model.score_pairs([(p.query, p.passage) for p in pairs[:4]])
        assert all(r.n_tokens == 0 for r in results)
    finally:
        replica.model.close()


def test_the_cli_ranks_like_the_reference(llama_cpp_gguf, pairs, reference_scores, tmp_path, capsys):
    """``rank1-local rerank --model <our GGUF> --query … --docs …``: the card's order and scores (within 1e-3)."""
    import json

    from rank1_local.cli.main import main

    query = pairs[0].query
    rows = [i for i, p in enumerate(pairs) if p.query == query]
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(pairs[i].passage for i in rows) + "\n")
    assert main(["-q", "rerank", "--model", str(llama_cpp_gguf["ours"]()), "--query", query, "--docs", str(docs),
                 "--format", "json", "--threads", "2"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    want = [reference_scores[None][i] for i in rows]
    assert [int(r["docid"]) for r in ranking] == sorted(range(len(rows)), key=lambda k: -want[k])
    assert all(abs(r["score"] - want[int(r["docid"])]) <= TOLERANCE for r in ranking)


def test_the_card_comes_from_the_gguf_metadata(llama_cpp_gguf, exported, tmp_path):
    """A Qwen3-Reranker GGUF under a name that says nothing (``model.gguf``) gets the qwen3-reranker card from its
    metadata (rank pooling, also with the naming keys taken out); a rank1 GGUF under the same name still gets
    rank1."""
    import shutil

    from rank1_local.backends.llama.facade import gguf_card
    from rank1_local.core.cards import QWEN3_RERANKER, RANK1, recognise_card
    from rank1_local.models.gguf_file import read_gguf_layout

    for source, gguf in [("ours", llama_cpp_gguf["ours"]()), ("theirs", llama_cpp_gguf["llama.cpp's converter"]()),
                         ("rank1", exported("behaving", "Q8_0"))]:
        anonymous = tmp_path / source / "model.gguf"
        anonymous.parent.mkdir()
        shutil.copyfile(gguf, anonymous)
        want = RANK1 if source == "rank1" else QWEN3_RERANKER
        assert gguf_card(anonymous, None) is want, source
        # the file's metadata alone, without the names (which say "reranker" here): its rank pooling decides
        metadata = {k: v for k, v in read_gguf_layout(anonymous).metadata.items()
                    if k not in ("general.name", "general.basename", "general.finetune")}
        assert recognise_card(gguf_metadata=metadata, name="model.gguf") is want, source


@pytest.fixture(scope="module")
def untied(fixture_dir, tmp_path_factory):
    """The fixture made untied (Qwen3-Reranker-8B's ``tie_word_embeddings: false``): an LM head of its own, whose
    "yes" and "no" rows are the embedding's swapped. Named so that llama.cpp's converter and ours take it for a
    Qwen3-Reranker."""
    from derived_models import UNTIED, derive, untied_answers

    return derive(fixture_dir(FIXTURE), tmp_path_factory.mktemp("derived") / "qwen3-reranker-untied", untied_answers,
                  UNTIED)


def _tensor_names(gguf):
    from rank1_local.models.gguf_file import read_gguf_layout

    return set(read_gguf_layout(gguf).tensors)


def test_an_untied_reranker_converted_by_llama_cpp_is_refused(untied, converted_by_llama_cpp, pairs, tmp_path,
                                                              monkeypatch, capsys):
    """llama.cpp's converter writes an untied Qwen3-Reranker's LM head only as the rank head (no output.weight), and
    llama.cpp would take the embedding for it: read so, this file scores 1 - the model's score. Our runtime refuses
    it (the library and ``rerank``: one line naming the missing output layer and the export that works) before the
    vocabulary or the weights are loaded; no output file is left."""
    from rank1_local import open_reranker
    from rank1_local.cli.main import main
    from rank1_local.core.errors import UnsupportedModelError

    gguf = converted_by_llama_cpp(untied, "f32")
    assert {"cls.output.weight", "token_embd.weight"} <= _tensor_names(gguf)
    assert "output.weight" not in _tensor_names(gguf)
    some, reference = pairs[::8], Qwen3RerankerReference(untied)
    want = reference.scores([(p.query, p.passage) for p in some], None)
    misread = _llama_cpp_scores(gguf, reference, some, None)
    assert max(abs(a - (1 - b)) for a, b in zip(misread, want, strict=True)) <= TOLERANCE

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("rank1_local.backends.llama.facade.LlamaTokenizer", never)
    with pytest.raises(UnsupportedModelError, match="output layer is missing") as refused:
        open_reranker("llama.cpp", gguf, threads=2)
    assert "convert_hf_to_gguf.py" in str(refused.value) and "rank1-quantize gguf" in str(refused.value)
    capsys.readouterr()  # transformers' bars, from the reference

    pairs_file, out = tmp_path / "pairs.jsonl", tmp_path / "run.jsonl"
    pairs_file.write_text('{"qid": "q", "query": "apple?", "docid": "d", "text": "About the apple."}\n')
    assert main(["-q", "rerank", "--model", str(gguf), "--pairs", str(pairs_file), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "output layer is missing" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("outtype, quantized", [("f32", None), ("q8_0", None), ("f16", "Q4_K_M")])
def test_the_output_layer_check_tells_tied_from_untied(outtype, quantized, fixture_dir, untied, converted_by_llama_cpp,
                                                       tmp_path):
    """Converted by llama.cpp (f32, q8_0, or f16 then quantized by llama.cpp's quantizer, where the rank head and the
    embedding get other types): the tied fixture's file passes the check, the untied one's is refused. The tied
    files' rows differ by rounding alone; the untied ones' are another row."""
    from quantize.llama_quantize import quantize_gguf
    from rank1_local.core.errors import UnsupportedModelError
    from rank1_local.models.output_layer import check_output_layer

    def converted(folder, name):
        gguf = converted_by_llama_cpp(folder, outtype)
        if quantized is None:
            return gguf
        quantize_gguf(gguf, tmp_path / f"{name}-{quantized}.gguf", quantized, threads=2)
        return tmp_path / f"{name}-{quantized}.gguf"

    check_output_layer(converted(fixture_dir(FIXTURE), "tied"))
    with pytest.raises(UnsupportedModelError, match="output layer is missing"):
        check_output_layer(converted(untied, "untied"))


def test_our_export_of_an_untied_reranker_keeps_its_lm_head(untied, fixture_dir, pairs, reference_scores, tmp_path):
    """Our exporter writes the untied fixture's LM head (output.weight) beside the rank head, and our runtime scores
    it within 1e-3 of the card's code on that model, in the same order; the model's scores are not the tied
    fixture's (a runtime reading the embedding for its LM head would fail here)."""
    from quantize.gguf_export import export_gguf
    from rank1_local import open_reranker
    from rank1_local.core.cards import QWEN3_RERANKER

    (result,) = export_gguf(untied, tmp_path / "out", "F32", progress=False)
    assert {"output.weight", "cls.output.weight"} <= _tensor_names(result.path)
    want = Qwen3RerankerReference(untied).scores([(p.query, p.passage) for p in pairs], None)
    assert max(abs(a - b) for a, b in zip(want, reference_scores[None], strict=True)) > 0.1
    with open_reranker("llama.cpp", result.path, threads=2, parallel=4) as reranker:
        assert reranker.card is QWEN3_RERANKER
        got = [r.score for r in reranker.score_pairs([(p.query, p.passage) for p in pairs])]
    _assert_like_the_reference(got, want, pairs)
