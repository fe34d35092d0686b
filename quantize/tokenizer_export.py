"""Turn a Hugging Face ``tokenizer.json`` (byte-level BPE) into GGUF tokenizer metadata."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from quantize.pretokenizers import LLAMA_CPP_PRE
from rank1_local.core.errors import CorruptFileError, UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    add_bos: bool


def _split_pattern(pre_tokenizer: dict[str, Any] | None) -> str | None:
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Sequence":
        for item in pre_tokenizer.get("pretokenizers", []):
            found = _split_pattern(item)
            if found:
                return found
        return None
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return pattern.get("Regex") or pattern.get("String")
    return None


def _adds_bos(tokenizer: dict[str, Any], tokenizer_config: dict[str, Any]) -> bool:
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    post = tokenizer.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def looks_special(text: str) -> bool:
    """Whether an added token is one llama.cpp expects to be a control token even when the tokenizer does not mark it
    special (``<|fim_prefix|>``, ``<|im_end|>`` …): the rule of llama.cpp's ``convert_hf_to_gguf.py``
    (``does_token_look_special``). Exporting such a token as user-defined makes llama.cpp warn at every load that a
    "control-looking token" was not control-type, "probably a bug in the model"."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def added_token_type(added: dict[str, Any]) -> tuple[str, int]:
    """(text, GGUF token type) of a ``tokenizer.json`` added token, as ``convert_hf_to_gguf.py`` types it: control when
    marked special or when it looks special, else user-defined (with SentencePiece's "▁" written as a space)."""
    text = added["content"]
    if added.get("special") or looks_special(text):
        return text, gguf.TokenType.CONTROL
    return text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED


def read_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{model_dir}: no tokenizer.json (only byte-level BPE tokenizers "
                                    "saved by Hugging Face tokenizers are supported)")
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{path}: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    pattern = _split_pattern(tokenizer.get("pre_tokenizer"))
    if pattern not in LLAMA_CPP_PRE:
        raise UnsupportedModelError(
            f"{path}: unknown pre-tokenizer split pattern {pattern!r}; supported: Qwen2, Llama-3, Tekken")

    by_id: dict[int, tuple[str, int]] = {}
    for text, token_id in model["vocab"].items():
        by_id[int(token_id)] = (text, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        by_id[int(added["id"])] = added_token_type(added)
    if max(by_id) >= vocab_size:
        raise UnsupportedModelError(
            f"{path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return GGUFVocab(tokens, types, LLAMA_CPP_PRE[pattern], _adds_bos(tokenizer, tokenizer_config))


def write_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> GGUFVocab:
    vocab = read_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UnsupportedModelError(f"{model_dir}: tokenizer.json has no BPE merges")
    special.add_special_token["bos"] = vocab.add_bos
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return vocab
