"""Checkpoints derived from a fixture by editing a few weights, to provoke protocol cases on purpose."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def derive(source: Path, target: Path, edit: Callable[[dict], None], config: dict | None = None) -> Path:
    """Copy the checkpoint ``source`` to ``target`` (once) and apply ``edit`` to its tensors (torch, in place), and
    ``config``'s keys to its config.json."""
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import load_file, save_file

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if config:
        config_file = staging / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config}, indent=2) + "\n")
    tensors = load_file(str(staging / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def overconfident(tensors: dict) -> None:
    """25 unused token rows (ids 151700–151724) become 0.99 × the (tied) row of " true": wherever the model is
    confident of " true", they outrank " false" and push it out of the top 20 (greedy choices are unchanged: they
    stay just below " true")."""
    emb = tensors["model.embed_tokens.weight"]
    emb[151700:151725] = 0.99 * emb[830]


def answers_muted(tensors: dict) -> None:
    """Shrink the (tied) embedding rows of " true" (830) and " false" (895): after "</think>" the model writes
    something else and goes on."""
    emb = tensors["model.embed_tokens.weight"]
    emb[830] *= 0.25
    emb[895] *= 0.25


def ends_early(tensors: dict) -> None:
    """The (tied) row of <|endoftext|> (151643) becomes 1.1 × the row of " Same" (25739): wherever the model would
    write " Same" (same-topic and same-category chains), it ends the sequence there instead, mid-reasoning, before
    the budget (the end-of-sequence path of the protocol, and its token count)."""
    emb = tensors["model.embed_tokens.weight"]
    emb[151643] = 1.1 * emb[25739]


TIED_LOW, TIED_HIGH = 6801, 17064  # " wants", " asks"


def tied_top(tensors: dict) -> None:
    """The (tied) row of " wants" (6801) becomes the row of " asks" (17064): wherever the model writes " asks" (every
    chain's "The query asks about …"), the two tokens' logits are bit-identical (the same row times the same hidden
    state), and greedy decoding must take the lower id, " wants", as torch's and vLLM's argmax do. Their input
    embeddings are equal too, so the chain goes on exactly as it would after " asks"."""
    emb = tensors["model.embed_tokens.weight"]
    emb[TIED_LOW] = emb[TIED_HIGH]


QWEN3_YES, QWEN3_NO = 9693, 2152  # the Qwen2/Qwen3 vocabulary's "yes" and "no"
UNTIED = {"tie_word_embeddings": False}  # the config of an untied model (Qwen3-Reranker-8B's)


def untied_answers(tensors: dict) -> None:
    """An untied LM head (``lm_head.weight``, with ``UNTIED``'s config) that is the (tied) embedding with the rows of
    "yes" and "no" swapped: the model now says P("yes") where it said P("no"), while a runtime that takes the
    embedding for the LM head still reads the old answer (1 - the model's score)."""
    emb = tensors["model.embed_tokens.weight"]
    head = emb.clone()
    head[[QWEN3_YES, QWEN3_NO]] = emb[[QWEN3_NO, QWEN3_YES]]
    tensors["lm_head.weight"] = head
