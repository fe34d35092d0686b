"""rank1 inside LangChain, LlamaIndex, Haystack and PyTerrier, driven by each framework's own classes and calling
code (``ContextualCompressionRetriever``, ``postprocess_nodes``, a Haystack ``Pipeline`` behind a BM25 retriever, a
PyTerrier pipeline behind PISA's BM25), on the behaving fixture GGUF: in process and against one live
``rank1-local serve`` shared by the module. Every order, score and metadata value is checked against
``Rank1.rerank`` on the same file (the server's scores within 1e-3: another process, another batch)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from benchmarks.server_process import ServerProcess  # noqa: E402
from quantize.fixtures.synthetic_task import make_pair  # noqa: E402
from rank1_local import Rank1, Rank1Error, ScoringConfig  # noqa: E402
from rank1_local.integrations.client import Rank1Client  # noqa: E402

KEY = "integration-key"
N_CTX, BUDGET = 512, 64
ARGS = ["--n-ctx", str(N_CTX), "--max-think-tokens", str(BUDGET), "--parallel", "4", "--threads", "2"]
WORDS = ["horse", "lemon", "apple", "cherry"]  # scores 0, ~0.64, 1, ~0.5: every position of the order is tested
QUERY = make_pair("apple", "apple").query
DOCS = [make_pair("apple", w).passage for w in WORDS]
SHORT = ScoringConfig(max_think_tokens=8, n_ctx=N_CTX)  # reasoning cut short: every answer is forced
TOL = 1e-3  # llama.cpp's batch variance between this process and the server's


@pytest.fixture(scope="module")
def model_file(exported):
    return exported("behaving", "Q8_0")


@pytest.fixture(scope="module")
def model(model_file):
    with Rank1(model_file, n_ctx=N_CTX, max_think_tokens=BUDGET, parallel=4, threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def expected(model):
    """Rank1.rerank's answer (best first) per protocol setting: the ground truth of every integration."""
    answers = {None: model.rerank(QUERY, DOCS), SHORT: model.rerank(QUERY, DOCS[:3], config=SHORT)}
    assert [r.index for r in answers[None]] == [2, 1, 3, 0]  # distinct scores: the order means something
    assert not any(r.forced for r in answers[None]) and all(r.forced for r in answers[SHORT])
    return answers


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(model_file, ARGS, log, api_key=KEY) as s:
        yield s


@pytest.fixture(params=["in-process", "server"])
def source(request, model):
    """What the integrations are given: the loaded Rank1, or the server's URL (with its key)."""
    if request.param == "in-process":
        return {"model": model}
    server = request.getfixturevalue("server")
    return {"model": server.url, "api_key": KEY}


def check(got, want, top_n=None):
    """got: (index, score, reasoning, forced) best first; want: Rank1.rerank's results."""
    want = want[:top_n] if top_n is not None else want
    assert [g[0] for g in got] == [w.index for w in want]
    for (_, score, reasoning, forced), w in zip(got, want, strict=True):
        assert abs(score - w.score) <= TOL and reasoning == w.reasoning and forced is w.forced


def test_crossencoder_shape_on_the_model(model, expected):
    """sentence-transformers' calls on a real model: one pair gives one numpy scalar; ``rank`` its list of dicts."""
    import numpy as np

    best = expected[None][0]
    score = model.predict((QUERY, DOCS[best.index]))
    assert isinstance(score, np.floating) and np.ndim(score) == 0 and abs(score - best.score) <= TOL
    ranked = model.rank(QUERY, DOCS, top_k=2, return_documents=True)
    assert ranked == [{"corpus_id": r.index, "score": pytest.approx(r.score, abs=TOL), "text": DOCS[r.index]}
                      for r in expected[None][:2]]
    assert all(type(row["score"]) is float for row in ranked)  # Python floats, as sentence-transformers gives


# --- the shared client ---------------------------------------------------------------------------------------------

def test_client_judges_like_rerank_in_process_and_from_the_server(source, expected):
    client = Rank1Client(source["model"], api_key=source.get("api_key"))
    ranked = client.rerank(QUERY, DOCS, top_n=3)
    check([(j.index, j.score, j.reasoning, j.forced) for j in ranked], expected[None], 3)
    assert all(j.n_tokens == w.n_tokens and not j.cached and not j.truncated for j, w in zip(ranked, expected[None]))
    short = Rank1Client(source["model"], api_key=source.get("api_key"), config=SHORT)
    check([(j.index, j.score, j.reasoning, j.forced) for j in short.rerank(QUERY, DOCS[:3])], expected[SHORT])
    client.close(), short.close()


def test_async_calls_do_not_block_the_event_loop(source, expected):
    client = Rank1Client(source["model"], api_key=source.get("api_key"))

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        ranked = await client.arerank(QUERY, DOCS)
        seconds = time.perf_counter() - started
        done.set()
        await task
        return ranked, ticks, seconds

    ranked, ticks, seconds = asyncio.run(main())
    check([(j.index, j.score, j.reasoning, j.forced) for j in ranked], expected[None])
    assert ticks >= max(3, 0.3 * seconds / 0.01)  # the loop kept turning while rank1 reasoned (blocked: 0 ticks)
    client.close()


def test_client_from_a_path_passes_the_judgment_cache_and_settings(model_file, expected, tmp_path):
    with Rank1Client(model_file, config=ScoringConfig(max_think_tokens=BUDGET, n_ctx=N_CTX),
                     cache=tmp_path / "cache.sqlite", parallel=4, threads=2) as client:
        first = client.rerank(QUERY, DOCS[:2])
        again = client.rerank(QUERY, DOCS[:2])
    want = [r for r in expected[None] if r.index < 2]
    check([(j.index, j.score, j.reasoning, j.forced) for j in first], want)
    assert not any(j.cached for j in first) and all(j.cached for j in again)
    assert [(j.index, j.score) for j in again] == [(j.index, j.score) for j in first]


def test_client_errors_are_one_line_and_name_the_problem(server, model):
    with pytest.raises(Rank1Error, match="answered 401: missing or wrong API key"):
        Rank1Client(server.url, api_key="wrong").judge(QUERY, DOCS[:1])
    with pytest.raises(Rank1Error, match="cannot reach the rank1-local server"):
        Rank1Client("http://127.0.0.1:9", timeout=2).judge(QUERY, DOCS[:1])
    with pytest.raises(Rank1Error, match="api_key is for a server URL"):
        Rank1Client(model, api_key="x")
    with pytest.raises(Rank1Error, match="top_n must be a positive integer"):
        Rank1Client(model).rerank(QUERY, DOCS, top_n=0)


# --- LangChain -----------------------------------------------------------------------------------------------------

def test_langchain_compressor(source, expected):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from rank1_local.integrations.langchain import Rank1Reranker

    docs = [Document(page_content=d, metadata={"source": w}, id=w) for d, w in zip(DOCS, WORDS)]
    reranker = Rank1Reranker(**source, top_n=3)
    out = reranker.compress_documents(docs, QUERY)
    check([(WORDS.index(d.id), d.metadata["relevance_score"], d.metadata["reasoning"], d.metadata["forced"])
           for d in out], expected[None], 3)
    assert all(d.metadata["source"] == d.id and d.page_content == DOCS[WORDS.index(d.id)] for d in out)
    assert all(set(d.metadata) == {"source"} for d in docs)  # the caller's documents are left as they were
    out = asyncio.run(Rank1Reranker(**source, config=SHORT).acompress_documents(docs[:3], QUERY))
    check([(WORDS.index(d.id), d.metadata["relevance_score"], d.metadata["reasoning"], d.metadata["forced"])
           for d in out], expected[SHORT])


def test_langchain_contextual_compression_retriever(source, expected):
    pytest.importorskip("langchain_core")
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda

    from rank1_local.integrations.langchain import Rank1Reranker

    base = RunnableLambda(lambda query: [Document(page_content=d, id=w) for d, w in zip(DOCS, WORDS)])
    retriever = retrievers.ContextualCompressionRetriever(base_compressor=Rank1Reranker(**source, top_n=2),
                                                          base_retriever=base)
    out = retriever.invoke(QUERY)
    check([(WORDS.index(d.id), d.metadata["relevance_score"], d.metadata["reasoning"], d.metadata["forced"])
           for d in out], expected[None], 2)


# --- LlamaIndex ----------------------------------------------------------------------------------------------------

def test_llama_index_postprocessor(source, expected):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from rank1_local.integrations.llama_index import Rank1Rerank

    nodes = [NodeWithScore(node=TextNode(text=d, id_=w, metadata={"word": w}), score=1.0 - i / 10)
             for i, (d, w) in enumerate(zip(DOCS, WORDS))]
    rerank = Rank1Rerank(**source, top_n=3, keep_retrieval_score=True)
    out = rerank.postprocess_nodes(nodes, query_str=QUERY)
    check([(WORDS.index(n.node.id_), n.score, n.node.metadata["reasoning"], n.node.metadata["forced"]) for n in out],
          expected[None], 3)
    for n in out:
        assert n.node.metadata["relevance_score"] == n.score and n.node.metadata["word"] == n.node.id_
        assert n.node.metadata["retrieval_score"] == nodes[WORDS.index(n.node.id_)].score
        assert "reasoning" not in n.node.get_content(MetadataMode.EMBED)  # rank1's verdict is not embedded
        assert n.node.metadata["reasoning"] in n.node.get_content(MetadataMode.LLM)
    assert all(set(n.node.metadata) == {"word"} for n in nodes)
    out = asyncio.run(Rank1Rerank(**source, config=SHORT).apostprocess_nodes(nodes[:3], query_str=QUERY))
    check([(WORDS.index(n.node.id_), n.score, n.node.metadata["reasoning"], n.node.metadata["forced"]) for n in out],
          expected[SHORT])


# --- Haystack ------------------------------------------------------------------------------------------------------

def test_haystack_ranker_in_a_pipeline(source, expected):
    haystack = pytest.importorskip("haystack")
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from rank1_local.integrations.haystack import Rank1Ranker

    store = InMemoryDocumentStore()
    store.write_documents([haystack.Document(content=d, meta={"word": w}) for d, w in zip(DOCS, WORDS)])
    pipeline = haystack.Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(store, top_k=10))
    pipeline.add_component("ranker", Rank1Ranker(**source, top_k=3))
    pipeline.connect("retriever.documents", "ranker.documents")
    out = pipeline.run({"retriever": {"query": QUERY}, "ranker": {"query": QUERY}})["ranker"]["documents"]
    check([(WORDS.index(d.meta["word"]), d.score, d.meta["reasoning"], d.meta["forced"]) for d in out],
          expected[None], 3)
    ranker = Rank1Ranker(**source, config=SHORT)
    docs = [haystack.Document(content=d, meta={"word": w}) for d, w in zip(DOCS[:3], WORDS)]
    out = ranker.run(QUERY, docs, top_k=2)["documents"]
    check([(WORDS.index(d.meta["word"]), d.score, d.meta["reasoning"], d.meta["forced"]) for d in out],
          expected[SHORT], 2)
    assert [d.id for d in out] == [docs[WORDS.index(d.meta["word"])].id for d in out] and docs[0].score is None
    out = asyncio.run(ranker.run_async(QUERY, docs))["documents"]
    check([(WORDS.index(d.meta["word"]), d.score, d.meta["reasoning"], d.meta["forced"]) for d in out],
          expected[SHORT])


def test_haystack_pipeline_with_a_server_ranker_serializes(server, expected):
    haystack = pytest.importorskip("haystack")
    from rank1_local.integrations.haystack import Rank1Ranker

    pipeline = haystack.Pipeline()
    pipeline.add_component("ranker", Rank1Ranker(server.url, top_k=2, config=SHORT))
    yaml = pipeline.dumps()
    assert KEY not in yaml  # the key comes from $RANK1_LOCAL_API_KEY where the pipeline is loaded
    loaded = haystack.Pipeline.loads(yaml, allowed_modules=["rank1_local.integrations.haystack"])
    ranker = loaded.get_component("ranker")
    assert ranker.config == SHORT and ranker.top_k == 2
    ranker.client.api_key = KEY
    docs = [haystack.Document(content=d, meta={"word": w}) for d, w in zip(DOCS[:3], WORDS)]
    out = loaded.run({"ranker": {"query": QUERY, "documents": docs}})["ranker"]["documents"]
    check([(WORDS.index(d.meta["word"]), d.score, d.meta["reasoning"], d.meta["forced"]) for d in out],
          expected[SHORT], 2)


# --- PyTerrier -----------------------------------------------------------------------------------------------------

def test_pyterrier_transformer_on_a_result_frame(source, expected):
    pt = pytest.importorskip("pyterrier")
    import pandas as pd

    from rank1_local.integrations.pyterrier import Rank1Transformer

    frame = pd.DataFrame({"qid": ["q1"] * 4 + ["q2"] * 3, "query": [QUERY] * 4 + [QUERY] * 3,
                          "docno": WORDS + [f"short-{w}" for w in WORDS[:3]], "text": DOCS + DOCS[:3],
                          "score": [9.0] * 7, "rank": list(range(7))})
    transformer = Rank1Transformer(**source)
    assert isinstance(transformer, pt.Transformer)
    out = transformer(frame)
    assert list(out.columns) == ["qid", "query", "docno", "text", "score", "reasoning", "forced", "rank"]
    for qid in ("q1", "q2"):
        rows = out[out.qid == qid]
        assert rows["rank"].tolist() == list(range(len(rows)))
        check([(WORDS.index(d.removeprefix("short-")), s, r, f) for d, s, r, f in
               zip(rows.docno, rows.score, rows.reasoning, rows.forced)], expected[None][:4] if qid == "q1" else
              [r for r in expected[None] if r.index < 3])
    assert (transformer % 2)(frame).groupby("qid").size().tolist() == [2, 2]  # PyTerrier's rank cutoff on our ranks
    with pytest.raises(Rank1Error, match="needs the columns qid, query, docno and text; the frame has no text"):
        transformer(frame.drop(columns=["text"]))
    empty = transformer(frame.iloc[:0])
    assert empty.empty and {"score", "rank"} <= set(empty.columns)


def test_pyterrier_bm25_get_text_rank1_pipeline(model, expected, tmp_path, monkeypatch):
    """The pipeline IR researchers write: ``bm25 % 100 >> pt.text.get_text(dataset, "text") >> Rank1Transformer``
    (BM25 from PISA, which needs no Java; the text from a local ir_datasets corpus, through PyTerrier's own loader)."""
    pt = pytest.importorskip("pyterrier")
    pisa = pytest.importorskip("pyterrier_pisa")
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "ir_datasets"))
    import ir_datasets

    from rank1_local.integrations.pyterrier import Rank1Transformer

    corpus = tmp_path / "docs.tsv"
    corpus.write_text("".join(f"{w}\t{d}\n" for w, d in zip(WORDS, DOCS)))
    ir_datasets.registry.register(f"rank1-local-test/{tmp_path.name}", ir_datasets.create_dataset(docs_tsv=str(corpus)))
    dataset = pt.get_dataset(f"irds:rank1-local-test/{tmp_path.name}")
    index = pisa.PisaIndex(str(tmp_path / "pisa"), text_field="text", stops="none")  # "the" matches all
    index.index({"docno": w, "text": d} for w, d in zip(WORDS, DOCS))
    bm25 = index.bm25()
    pipeline = bm25 % 100 >> pt.text.get_text(dataset, "text") >> Rank1Transformer(model)
    out = pipeline.search(QUERY)
    assert set(out.docno) == set(WORDS)  # BM25 found every passage (through "the")
    check([(WORDS.index(d), s, r, f) for d, s, r, f in zip(out.docno, out.score, out.reasoning, out.forced)],
          expected[None])
    assert out["rank"].tolist() == [0, 1, 2, 3]
