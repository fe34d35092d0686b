"""``rank1-local serve --backend vllm``: the same server in front of vLLM (the official engine; its CPU build here,
``pip install vllm`` on a GPU box), answering the Cohere SDK with the scores the vLLM backend gives in the library
(vLLM tier: runs in the vLLM virtualenv that `.ci/run` builds)."""

from __future__ import annotations

import pytest

from quantize.fixtures.synthetic_task import make_pair

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from benchmarks.server_process import ServerProcess  # noqa: E402
from rank1_local.backends.vllm import VllmRank1  # noqa: E402

N_CTX, BUDGET, KEY = 512, 64, "test-key-123"
WORDS = ["horse", "lemon", "apple", "cherry"]
QUERY = make_pair("apple", "apple").query
DOCS = [make_pair("apple", w).passage for w in WORDS]


def test_serve_backend_vllm_answers_the_cohere_sdk(fixture_dir, tmp_path):
    cohere = pytest.importorskip("cohere")
    checkpoint = fixture_dir("behaving")
    with VllmRank1(checkpoint, n_ctx=N_CTX, max_think_tokens=BUDGET, dtype="float32") as m:
        expected = m.score_pairs([(QUERY, d) for d in DOCS])
    args = ["--backend", "vllm", "--dtype", "float32", "--n-ctx", str(N_CTX), "--max-think-tokens", str(BUDGET),
            "--name", "vllm"]
    with ServerProcess(checkpoint, args, tmp_path / "server.log", api_key=KEY, startup_timeout=600) as s:
        response = cohere.ClientV2(api_key=KEY, base_url=s.url).rerank(model="vllm", query=QUERY, documents=DOCS)
        assert sorted(x.index for x in response.results) == list(range(len(DOCS)))
        assert all(abs(x.relevance_score - expected[x.index].score) <= 1e-6 for x in response.results)
        meta = httpx.get(s.url + "/v1/models", headers=s.headers, timeout=30).json()["data"][0]["meta"]
        assert meta["backend"] == "vllm"
        refused = httpx.post(s.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "protocol": "full"},
                             headers=s.headers, timeout=60)
        assert refused.status_code == 422 and "official protocol only" in refused.json()["message"]
