"""Which exports get llama-server's Qwen3-Reranker head, and what a bad request for one gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf import GGUFReader

from quantize.architectures import arch_spec, read_hparams
from quantize.checkpoint import Checkpoint
from quantize.cli import main as quantize_cli
from quantize.rerank_head import plan_rerank_head, recognise
from rank1_local.core.errors import UnsupportedModelError

QWEN3_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "num_attention_heads": 4,
                "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 151936, "head_dim": 128}


def _checkpoint(folder: Path, name: str, config: dict | None = None) -> Checkpoint:
    return Checkpoint(path=folder, name=name, config=config or QWEN3_CONFIG, tensors={})


@pytest.mark.quick
@pytest.mark.parametrize("name, config, readme, expected", [
    ("Qwen3-Reranker-0.6B", {}, None, "its name 'Qwen3-Reranker-0.6B'"),  # a hub id's name, or a folder's
    ("snapshot-1234", {"_name_or_path": "Qwen/Qwen3-Reranker-8B"}, None, "_name_or_path"),
    ("snapshot-1234", {}, "---\nlicense: apache-2.0\n---\n# Qwen3-Reranker-4B\n", "model card"),
    ("Qwen3-8B", {}, "# Qwen3-8B\nA reranker? No.\n", None),
    ("qwen3-embedding-0.6b", {"_name_or_path": "Qwen/Qwen3-Embedding-0.6B"}, None, None),
])
def test_recognition(tmp_path, name, config, readme, expected):
    """The rule of llama.cpp's converter: the name, config.json's _name_or_path, or the model card's heading."""
    if readme is not None:
        (tmp_path / "README.md").write_text(readme)
    reason = recognise(_checkpoint(tmp_path, name, {**QWEN3_CONFIG, **config}))
    assert (reason is None) if expected is None else (expected in reason)


@pytest.mark.quick
def test_asking_decides_and_other_architectures_are_refused(tmp_path):
    recognised = _checkpoint(tmp_path, "Qwen3-Reranker-0.6B")
    spec, hp = arch_spec(QWEN3_CONFIG), read_hparams(QWEN3_CONFIG)
    assert plan_rerank_head(recognised, spec, hp, rerank=False) is None  # --no-rerank: a plain Qwen3 export
    qwen2 = {**QWEN3_CONFIG, "architectures": ["Qwen2ForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="Qwen3-Reranker checkpoints \\(Qwen3ForCausalLM\\) only"):
        plan_rerank_head(_checkpoint(tmp_path, "rank1-7b", qwen2), arch_spec(qwen2), read_hparams(qwen2), True)


def _tensor_names(path: Path) -> set[str]:
    return {t.name for t in GGUFReader(path).tensors}


def test_cli_rerank_flags(fixture_dir, tmp_path, capsys):
    """``--rerank`` adds the head to any Qwen3 checkpoint, ``--no-rerank`` leaves it out of a recognised one, and
    ``--rerank`` on another architecture is one line and exit 2, before anything is written."""
    assert quantize_cli(["-q", "gguf", str(fixture_dir("qwen3")), "--out", str(tmp_path / "a"), "--types", "F16",
                         "--rerank"]) == 0
    (made,) = (tmp_path / "a").glob("*.gguf")
    assert "cls.output.weight" in _tensor_names(made)

    named = tmp_path / "Qwen3-Reranker-like"
    shutil.copytree(fixture_dir("qwen3"), named)
    assert quantize_cli(["-q", "gguf", str(named), "--out", str(tmp_path / "b"), "--types", "F16"]) == 0
    assert quantize_cli(["-q", "gguf", str(named), "--out", str(tmp_path / "c"), "--types", "F16",
                         "--no-rerank"]) == 0
    (recognised,), (plain,) = (tmp_path / "b").glob("*.gguf"), (tmp_path / "c").glob("*.gguf")
    assert "cls.output.weight" in _tensor_names(recognised) and "cls.output.weight" not in _tensor_names(plain)
    capsys.readouterr()

    assert quantize_cli(["-q", "gguf", str(fixture_dir("qwen2-tied")), "--out", str(tmp_path / "d"), "--types", "F16",
                         "--rerank"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Qwen3ForCausalLM" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_a_tokenizer_without_yes_or_no_is_refused(fixture_dir, tmp_path):
    from quantize.gguf_export import export_gguf

    folder = tmp_path / "model"
    shutil.copytree(fixture_dir("qwen3"), folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    del tokenizer["model"]["vocab"]["yes"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedModelError, match="no token 'yes'"):
        export_gguf(folder, tmp_path / "out", "F16", progress=False, rerank=True)
    assert not (tmp_path / "out").exists()


def test_quantized_exports_keep_the_rerank_head(fixture_dir, tmp_path):
    """Types made by llama.cpp's quantizer (from our lossless export) keep the head and the metadata llama-server
    reads."""
    from quantize.gguf_export import export_gguf

    folder = tmp_path / "Qwen3-Reranker-tiny"
    folder.mkdir()
    for f in fixture_dir("qwen3").iterdir():
        (folder / f.name).symlink_to(f)
    (result,) = export_gguf(folder, tmp_path / "out", "Q4_K_M", progress=False)
    reader = GGUFReader(result.path)
    assert "cls.output.weight" in {t.name for t in reader.tensors}
    kv = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
    assert kv["qwen3.pooling_type"] == 4 and kv["qwen3.classifier.output_labels"] == ["yes", "no"]
    assert "<Query>: {query}" in kv["tokenizer.chat_template.rerank"]
