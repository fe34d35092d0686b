"""Which card a model gets from its own facts: GGUF metadata, a Hugging Face config, a name."""

from __future__ import annotations

import pytest

from rank1_local.core.cards import QWEN3_RERANKER, RANK1, recognise_card

pytestmark = pytest.mark.quick


def test_rank_pooling_in_a_qwen3_gguf_is_enough():
    """What llama.cpp's converter and ours write for a Qwen3-Reranker (pooling type 4, RANK), under names that say
    nothing: the qwen3-reranker card, with no card field anywhere."""
    metadata = {"general.architecture": "qwen3", "general.name": "Model", "qwen3.pooling_type": 4}
    assert recognise_card(gguf_metadata=metadata, name="model.gguf") is QWEN3_RERANKER
    assert recognise_card(gguf_metadata={**metadata, "qwen3.pooling_type": 0}, name="model.gguf") is RANK1
    assert recognise_card(gguf_metadata={k: v for k, v in metadata.items() if k != "qwen3.pooling_type"},
                          name="model.gguf") is RANK1


def test_rank1_models_stay_rank1():
    for arch, name in [("qwen2", "rank1-7b"), ("llama", "rank1-llama3-8b"), ("qwen2", "model")]:
        assert recognise_card(gguf_metadata={"general.architecture": arch, "general.name": name},
                              name=f"{name}.gguf") is RANK1
    assert recognise_card(hf_config={"architectures": ["Qwen2ForCausalLM"], "_name_or_path": "jhu-clsp/rank1-7b"},
                          name="rank1-7b") is RANK1


def test_names_and_configs_say_qwen3_reranker():
    assert recognise_card(gguf_metadata={"general.architecture": "qwen3", "general.name": "Qwen3 Reranker 0.6B"},
                          name="x.gguf") is QWEN3_RERANKER
    assert recognise_card(hf_config={"architectures": ["Qwen3ForCausalLM"],
                                     "_name_or_path": "Qwen/Qwen3-Reranker-0.6B"}) is QWEN3_RERANKER
    assert recognise_card(name="Qwen3-Reranker-4B-Q8_0.gguf") is QWEN3_RERANKER
    # a plain Qwen3 is not a reranker
    assert recognise_card(hf_config={"architectures": ["Qwen3ForCausalLM"], "_name_or_path": "Qwen/Qwen3-0.6B"},
                          name="Qwen3-0.6B") is RANK1


@pytest.mark.parametrize("command", ["rerank", "serve"])
def test_an_unknown_card_names_the_cards(command, tmp_path, capsys):
    """``--card nope`` is refused before the model is looked at (here an empty file), naming every card."""
    from rank1_local.cli.main import main

    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    docs = tmp_path / "docs.txt"
    docs.write_text("a\n")
    extra = ["--query", "q", "--docs", str(docs)] if command == "rerank" else []
    assert main([command, "--model", str(model), "--card", "nope", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model card 'nope'") and "rank1 (" in err and "qwen3-reranker (" in err
    assert "Traceback" not in err
