"""A scripted decoding engine for scheduler tests: no model, no torch, deterministic.

Tokens: 0 end-of-generation, 1 " true", 2 " false", 3 "</think>", 4 "<think>", then one token per UTF-8 byte.
Each sequence's KV cache is a list of tokens; a batch entry must continue its sequence exactly (position =
current length), so any bookkeeping mistake in the scheduler fails loudly. The next token is decided by a
*behaviour*: ``behaviour(passage, generated_text) -> str`` returns the next token's text ("" = end of generation).
When a sequence ends in "</think>", the logits of " true" / " false" are ``answer(passage, generated_text)``; elsewhere
they are ``background`` (by default far below the other tokens' -10, so outside any top 20).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from rank1_local.backends.llama.engine import BatchEntry, DeviceInfo
from rank1_local.core.decoder import HostRow

EOG, TRUE, FALSE, CLOSE, OPEN = 0, 1, 2, 3, 4
SPECIAL = {" true": TRUE, " false": FALSE, "</think>": CLOSE, "<think>": OPEN}
BYTE0 = 5
N_VOCAB = BYTE0 + 256

Behaviour = Callable[[str, str], str]


def scripted(scripts: dict[str, str], default: str = "\nNo idea.</think>") -> Behaviour:
    """Each passage (matched by substring) writes its script, then stops (end of generation)."""
    def behaviour(passage: str, generated: str) -> str:
        script = next((s for key, s in scripts.items() if key in passage), default)
        if not script.startswith(generated):
            return ""
        rest = script[len(generated):]
        if not rest:
            return ""
        return next((word for word in SPECIAL if rest.startswith(word)), rest.encode()[:1].decode("latin-1"))
    return behaviour


class FakeEngine:
    def __init__(self, behaviour: Behaviour, *, n_batch: int = 64,
                 answer: Callable[[str, str], tuple[float, float]] | None = None,
                 background: tuple[float, float] = (-20.0, -20.0)) -> None:
        self.behaviour = behaviour
        self.background = background
        self.answer = answer or (lambda passage, generated: (1.0, 0.0) if "relevant" in passage else (0.0, 1.5))
        self.n_batch = n_batch
        self.seqs: dict[int, list[int]] = {}
        self.decode_calls = 0
        self.batch_sizes: list[int] = []
        self.evaluated = 0
        self.device = DeviceInfo(gpu_offload_supported=False, n_gpu_layers=0, n_layers=1)
        self.closed = False
        self.threads: set[int] = set()  # the threads that touched the KV cache or decoded: one owner, always

    def close(self) -> None:
        self.closed = True

    # --- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            word = next((w for w in SPECIAL if text.startswith(w, i)), None)
            if word:
                ids.append(SPECIAL[word])
                i += len(word)
            else:
                ids += [BYTE0 + b for b in text[i].encode()]
                i += 1
        return ids

    def piece(self, token: int) -> bytes:
        if token == EOG:
            return b""
        for word, tid in SPECIAL.items():
            if tid == token:
                return word.encode()
        return bytes([token - BYTE0])

    def detokenize(self, ids: list[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", "ignore")

    def is_eog(self, token: int) -> bool:
        return token == EOG

    # --- KV cache ---------------------------------------------------------------------------------------
    def _touch(self) -> None:
        assert not self.closed, "the engine was used after it was closed"
        self.threads.add(threading.get_ident())

    def seq_copy(self, src: int, dst: int) -> None:
        self._touch()
        self.seqs[dst] = list(self.seqs.get(src, []))

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._touch()
        assert p1 == -1
        self.seqs[seq] = self.seqs.get(seq, [])[:max(p0, 0)] if p0 >= 0 else []

    def clear(self) -> None:
        self._touch()
        self.seqs.clear()

    # --- decoding ---------------------------------------------------------------------------------------
    def _next_logits(self, tokens: list[int]) -> np.ndarray:
        logits = np.full(N_VOCAB, -10.0, dtype=np.float32)
        # away from the answer, " true" / " false" are far outside the top 20 (unless ``background`` says otherwise)
        logits[TRUE], logits[FALSE] = self.background
        text = self.detokenize(tokens)
        passage = text[text.index("Passage: ") + 9:text.index("\n<think>")]
        generated = text[text.index("<think>") + len("<think>"):]
        nxt = self.behaviour(passage, generated)
        if tokens[-1] == CLOSE:
            logits[TRUE], logits[FALSE] = self.answer(passage, generated)
            if nxt and self.tokenize(nxt)[0] not in (TRUE, FALSE):  # e.g. "\n" after "</think>" instead of an answer
                logits[self.tokenize(nxt)[0]] = 10.0
            return logits
        token = self.tokenize(nxt)[0] if nxt else EOG
        logits[token] = 10.0
        return logits

    def decode(self, entries: list[BatchEntry]) -> dict[int, np.ndarray]:
        assert 0 < len(entries) <= self.n_batch
        self._touch()
        self.decode_calls += 1
        self.batch_sizes.append(len(entries))
        out = {}
        for i, e in enumerate(entries):
            seq = self.seqs.setdefault(e.seq_id, [])
            assert e.pos == len(seq), f"sequence {e.seq_id}: token at position {e.pos}, but it holds {len(seq)}"
            seq.append(e.token)
            self.evaluated += 1
            if e.logits:
                out[i] = HostRow(self._next_logits(seq))
        return out


class RecordingEngine(FakeEngine):
    """A :class:`FakeEngine` that remembers which sequences each decode call advanced."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seqs_per_call: list[set[int]] = []

    def decode(self, entries):
        self.seqs_per_call.append({e.seq_id for e in entries})
        return super().decode(entries)


def scripted_rank1(engine: FakeEngine, parallel: int, config, *, cache=None, max_waiting: int | None = None,
                   model_path=None):
    """A real :class:`Rank1` (owner thread, pipeline, cache) running the scripted engine instead of llama.cpp."""
    from pathlib import Path

    from rank1_local import LlamaSettings, Rank1

    class ScriptedRank1(Rank1):
        def __init__(self) -> None:
            self._start(config, LlamaSettings(parallel=parallel, max_waiting=max_waiting),
                        Path(model_path or "scripted.gguf"), lambda: engine, lambda: engine, cache)

    return ScriptedRank1()


class DeviceEngine(FakeEngine):
    """A :class:`FakeEngine` whose rows are read "on the device": each holds only its top 20 candidates, unless its
    entry asks for the full logits (``entry.host``). Counts the rows of each kind."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device_rows = self.host_rows = 0

    def decode(self, entries):
        from rank1_local.core.decoder import CandidateRow

        rows = super().decode(entries)
        for i, row in list(rows.items()):
            if entries[i].host:
                self.host_rows += 1
                continue
            self.device_rows += 1
            ids = np.argsort(-row.values, kind="stable")[:20]
            rows[i] = CandidateRow(ids.tolist(), row.values[ids].tolist())
        return rows
