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
