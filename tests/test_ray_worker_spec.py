"""What a Ray worker opens is typed and checked on the driver (quick: nothing here imports Ray): the backend's settings
object, not a loose dict, so a setting the backend does not know fails before any worker starts."""

from __future__ import annotations

import pickle

import pytest

from rank1_local.backends.llama.facade import LlamaSettings
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.integrations.ray_batch import WorkerSpec, worker_spec

pytestmark = pytest.mark.quick
CONFIG = ScoringConfig(max_think_tokens=16)


def test_llama_cpp_settings_are_typed_with_the_workers_threads():
    spec = worker_spec("llama.cpp", "m.gguf", CONFIG, {"parallel": 4, "cache": "~/c.sqlite", "gguf_type": "Q8_0"},
                       threads_per_worker=3)
    assert isinstance(spec.settings, LlamaSettings)
    assert (spec.settings.parallel, spec.settings.threads) == (4, 3)
    assert spec.cache is not None and "~" not in spec.cache and spec.gguf_type == "Q8_0"
    assert spec.config is CONFIG
    assert pickle.loads(pickle.dumps(spec)) == spec  # what Ray ships to each worker


def test_a_setting_the_backend_does_not_know_fails_on_the_driver():
    with pytest.raises(Rank1Error, match="the llama.cpp backend has no setting paralel"):
        worker_spec("llama.cpp", "m.gguf", CONFIG, {"paralel": 4}, threads_per_worker=1)


def test_cache_and_gguf_type_only_where_the_backend_takes_them():
    with pytest.raises(Rank1Error, match="llama.cpp backend only"):
        worker_spec("transformers", "ckpt", CONFIG, {"cache": "c.sqlite"}, threads_per_worker=1)
    with pytest.raises(Rank1Error, match="runs checkpoints"):
        worker_spec("transformers", "ckpt", CONFIG, {"gguf_type": "Q8_0"}, threads_per_worker=1)
    with pytest.raises(Rank1Error, match="path of the judgment cache"):
        worker_spec("llama.cpp", "m.gguf", CONFIG, {"cache": object()}, threads_per_worker=1)
    assert isinstance(worker_spec("transformers", "ckpt", CONFIG, {}, threads_per_worker=1), WorkerSpec)


def test_ray_rows_have_every_field_of_a_run_files_row():
    from rank1_local.core.results import Rank1Result, result_dict
    from rank1_local.integrations.ray_batch import RESULT_COLUMNS

    result = Rank1Result(index=0, score=0.9, reasoning="r", n_tokens=3, forced=False, truncated=False,
                         passage_tokens_dropped=0, n_prompt_tokens=40, seconds=0.1)
    assert RESULT_COLUMNS == tuple(result_dict(result, qid="q", docid="d"))


def test_the_card_goes_to_every_worker_and_an_unknown_one_fails_on_the_driver():
    """``--card`` (or ``card=`` among the engine settings) rides in the spec each worker opens its model with; left
    out, each worker recognises the card from the model as a local run does."""
    import argparse

    from rank1_local.cli.main import backend_choice
    from rank1_local.cli.ray_commands import _engine

    args = argparse.Namespace(backend="llama.cpp", card="Qwen3-Reranker", parallel=2)
    engine = _engine(backend_choice(args))
    assert engine["card"] == "Qwen3-Reranker"
    spec = worker_spec("llama.cpp", "m.gguf", CONFIG, engine, threads_per_worker=1)
    assert spec.card == "qwen3-reranker" and pickle.loads(pickle.dumps(spec)) == spec
    assert worker_spec("transformers", "ckpt", CONFIG, {"card": "rank1"}, threads_per_worker=1).card == "rank1"
    assert worker_spec("llama.cpp", "m.gguf", CONFIG, {}, threads_per_worker=1).card is None
    assert "card" not in _engine(backend_choice(argparse.Namespace(backend="llama.cpp")))
    with pytest.raises(Rank1Error, match="no model card 'bge'; the cards are: rank1"):
        worker_spec("llama.cpp", "m.gguf", CONFIG, {"card": "bge"}, threads_per_worker=1)


def test_serve_on_ray_gives_each_replica_the_card(monkeypatch, tmp_path):
    """``rank1-local serve --ray --card NAME``: the replica spec carries the card (a replica opens its model with
    ``ReplicaSpec.card``, see tests/test_ray_serve.py)."""
    import rank1_local.integrations.ray_serve as ray_serve
    from rank1_local.cli.main import main

    seen = []
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda spec, options, **kw: seen.append(spec))
    assert main(["-q", "serve", "--model", str(tmp_path / "m.gguf"), "--card", "qwen3-reranker", "--ray",
                 "--insecure-no-auth"]) == 0
    (spec,) = seen
    assert spec.card == "qwen3-reranker"
