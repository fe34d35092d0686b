"""The behaving fixture keeps its task accuracy after F16 and Q8_0 export.

Scored with a plain sequential llama.cpp loop (greedy until ``</think>`` shows up in the decoded
text, then P(" true") / (P(" true") + P(" false")) at the next position), against the same
protocol in transformers fp32 on the source checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama

from quantize.fixtures.synthetic_task import SyntheticPair, eval_pairs
from rank1_local.core.prompt import build_prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TRUE_ID, FALSE_ID = 830, 895
MAX_NEW = 48


def _score(logits) -> float:
    return float(1 / (1 + np.exp(float(logits[FALSE_ID]) - float(logits[TRUE_ID]))))


def llama_cpp_run(path, pairs):
    # logits_all: without it llama-cpp-python keeps no logits in `scores`
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    out = []
    try:
        for pair in pairs:
            llm.reset()
            llm.eval(llm.tokenize(build_prompt(pair.query, pair.passage).encode(), add_bos=True))
            generated: list[int] = []
            score = None
            for _ in range(MAX_NEW):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                generated.append(nxt)
                llm.eval([nxt])
                if "</think>" in llm.detokenize(generated).decode("utf-8", "replace"):
                    score = _score(llm.scores[llm.n_tokens - 1])
                    break
            out.append((llm.detokenize(generated).decode("utf-8", "replace"), score))
    finally:
        llm.close()
    return out


def transformers_run(model_dir, pairs):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            ids = tok.encode(build_prompt(pair.query, pair.passage))
            generated: list[int] = []
            score = None
            for _ in range(MAX_NEW):
                logits = model(torch.tensor([ids + generated])).logits[0, -1]
                generated.append(int(logits.argmax()))
                if "</think>" in tok.decode(generated):
                    score = _score(model(torch.tensor([ids + generated])).logits[0, -1].numpy())
                    break
            out.append((tok.decode(generated), score))
    return out


def accuracy(pairs: list[SyntheticPair], run) -> float:
    ok = 0
    for pair, (_, score) in zip(pairs, run, strict=True):
        if score is None:
            continue
        ok += abs(score - pair.target) < 0.15 if pair.kind == "related" else (score > 0.5) == pair.label
    return ok / len(pairs)


@pytest.fixture(scope="module")
def reference(fixture_dir):
    pairs = eval_pairs()
    return pairs, transformers_run(fixture_dir("behaving"), pairs)


def test_a_fixture_that_does_not_behave_is_refused(fixture_dir, tmp_path):
    """The fixture build checks its trained behaviour (chains, verdicts, margins, unsure pairs) and refuses a model
    that lost it: here the behaving fixture with its final norm negated (every logit's sign flips)."""
    from derived_models import derive

    from quantize.fixtures.registry import check_behaviour
    from rank1_local.core.errors import Rank1Error

    built = fixture_dir("behaving")
    assert check_behaviour("behaving", built)["exact_reasoning"] >= 0.95
    with pytest.raises(Rank1Error, match="does not behave"):
        check_behaviour("behaving", derive(built, tmp_path / "negated", _negate_final_norm))


def _negate_final_norm(tensors: dict) -> None:
    tensors["model.norm.weight"] *= -1


@pytest.mark.parametrize("gguf_type, max_score_diff", [("F16", 0.01), ("Q8_0", 0.05)])
def test_export_keeps_accuracy(gguf_type, max_score_diff, reference, exported):
    pairs, ref = reference
    run = llama_cpp_run(exported("behaving", gguf_type), pairs)
    same_text = np.mean([a[0] == b[0] for a, b in zip(ref, run, strict=True)])
    assert same_text >= 0.95
    assert accuracy(pairs, run) >= accuracy(pairs, ref) - 0.02
    diffs = [abs(a[1] - b[1]) for a, b in zip(ref, run, strict=True) if a[0] == b[0]]
    assert max(diffs) <= max_score_diff
