"""Picking a published GGUF by its exact type, and hub access that fails fast offline (quick tier)."""

from __future__ import annotations

import time

import pytest

from rank1_local.core.errors import ModelNotFoundError
from rank1_local.models.model_files import gguf_file_type, resolve_gguf, select_gguf

pytestmark = pytest.mark.quick

REPO = ["README.md", "rank1-7b-BF16.gguf", "rank1-7b-F16.gguf", "rank1-7b.Q4_K_M.gguf", "rank1-7b-q8_0.gguf",
        "rank1-7b-Q6_K-00002-of-00002.gguf", "rank1-7b-Q6_K-00001-of-00002.gguf", "imatrix.dat"]


def test_file_type_from_name():
    assert gguf_file_type("rank1-7b-BF16.gguf") == "BF16"
    assert gguf_file_type("sub/rank1-7b.Q4_K_M.gguf") == "Q4_K_M"
    assert gguf_file_type("rank1-7b-Q6_K-00001-of-00002.gguf") == "Q6_K"
    assert gguf_file_type("README.md") is None and gguf_file_type("model.gguf") is None


def test_exact_type_match_f16_is_not_bf16():
    assert select_gguf(REPO, "F16") == ["rank1-7b-F16.gguf"]
    assert select_gguf(REPO, "BF16") == ["rank1-7b-BF16.gguf"]
    assert select_gguf(REPO, "q8_0") == ["rank1-7b-q8_0.gguf"]
    assert select_gguf(REPO, "Q2_K") == []


def test_split_files_come_whole_first_part_first():
    assert select_gguf(REPO, "Q6_K") == ["rank1-7b-Q6_K-00001-of-00002.gguf", "rank1-7b-Q6_K-00002-of-00002.gguf"]
    with pytest.raises(ModelNotFoundError, match="split GGUF of 3 parts, but 2"):
        select_gguf(["m-Q4_0-00001-of-00003.gguf", "m-Q4_0-00002-of-00003.gguf"], "Q4_0")


def test_offline_hub_id_fails_at_once_with_the_local_route(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="(?s)jhu-clsp/rank1-7b.*not in the local cache.*local .gguf"):
        resolve_gguf("jhu-clsp/rank1-7b")
    assert time.perf_counter() - start < 5


def test_a_missing_local_file_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_gguf(str(tmp_path / "nothing" / "model.gguf"))


def test_offline_the_command_that_works_comes_first(tmp_path, monkeypatch):
    """Pulling a checkpoint repository is an error, so for one the exporter's command comes first; for a repository
    that publishes GGUF files, pull does."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as checkpoint:
        resolve_gguf("jhu-clsp/rank1-0.5b")
    message = str(checkpoint.value)
    export = "rank1-quantize gguf jhu-clsp/rank1-0.5b --out models --types Q8_0 --bundle rank1-0.5b-Q8_0"
    assert export in message and message.index(export) < message.index("rank1-local pull")
    with pytest.raises(ModelNotFoundError) as gguf_repo:
        resolve_gguf("someone/rank1-7b-GGUF")
    message = str(gguf_repo.value)
    assert message.index("rank1-local pull someone/rank1-7b-GGUF --gguf-type Q4_K_M") < message.index("rank1-quantize")
    with pytest.raises(ModelNotFoundError) as named_by_type:  # a name that carries the type keeps it once
        resolve_gguf("someone/rank1-0.5b-Q8_0")
    assert "--bundle rank1-0.5b-Q8_0`" in str(named_by_type.value)
