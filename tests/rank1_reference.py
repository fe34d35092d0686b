"""An independent reference of the rank1 protocols in transformers (fp32, greedy), for the tests.

Written from the official code's rules (orionw/rank1, ``rank1.py``) on its own — it shares no code with
rank1_local. ``official``: stop once the decoded text contains "</think> true" / "</think> false", at EOS or at
the budget (every generated token counts); score from the top-20 of the last generated position when both
answers are there, else the fallback on the cut text. ``full``: the answer right after "</think>".
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE = ("Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
            "Query: {query}\nPassage: {passage}\n<think>")
STOPS = ("</think> true", "</think> false")


@dataclass
class RefResult:
    score: float
    reasoning: str
    n_tokens: int
    forced: bool


def official_cut(text: str) -> str:
    text = text.rstrip()
    if not text.endswith((".", "!", "?")):
        last = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
        if last != -1:
            text = text[:last + 1]
    return text.strip()


class Reference:
    def __init__(self, model_dir):
        import torch
        import transformers

        self.torch = torch
        self.tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.true_id = self.tok.encode(" true", add_special_tokens=False)[0]
        self.false_id = self.tok.encode(" false", add_special_tokens=False)[0]

    def _next_logits(self, ids):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0, -1]

    def _score(self, logits) -> float:
        pair = self.torch.stack([logits[self.true_id], logits[self.false_id]])
        return float(self.torch.softmax(pair.double(), 0)[0])

    def _fallback(self, prompt: str, text: str, n_ctx: int) -> float:
        ids = self.tok.encode(prompt + "\n" + official_cut(text) + "\n</think>")
        return 0.5 if len(ids) > n_ctx else self._score(self._next_logits(ids))

    def score(self, query, passage, max_think_tokens=1024, rethink_rounds=0, protocol="official",
              n_ctx=4096) -> RefResult:
        prompt = TEMPLATE.format(query=query, passage=passage)
        context = self.tok.encode(prompt)
        if len(context) > n_ctx:
            return RefResult(0.5, "", 0, False)
        generated = 0
        base, new_tokens = "", []  # text = base + decode(new_tokens); base changes on rethink
        text = ""
        while True:
            logits = self._next_logits(context)
            token = int(logits.argmax())
            eos = token == self.tok.eos_token_id
            if eos and protocol == "full":
                break
            context.append(token)
            new_tokens.append(token)
            generated += 1
            text = base + self.tok.decode(new_tokens[:-1] if eos else new_tokens)
            if "</think>" in text and rethink_rounds > 0 and generated < max_think_tokens:
                rethink_rounds -= 1
                base, new_tokens = text[: text.index("</think>")] + "\nWait", []
                text = base
                context = self.tok.encode(prompt + base)
                continue
            reasoning = text[: text.index("</think>")] if "</think>" in text else text
            if protocol == "full":
                if "</think>" in text:
                    return RefResult(self._score(self._next_logits(context)), reasoning, generated, False)
                if generated >= max_think_tokens or len(context) > n_ctx:
                    break
                continue
            stop = min([text.index(s) for s in STOPS if s in text], default=-1)
            if eos or stop >= 0 or generated >= max_think_tokens or len(context) > n_ctx:
                top = set(self.torch.topk(logits, 20).indices.tolist())
                if self.true_id in top and self.false_id in top:
                    return RefResult(self._score(logits), reasoning, generated, False)
                out_text = text[:stop] if stop >= 0 else text
                return RefResult(self._fallback(prompt, out_text, n_ctx), reasoning, generated, True)
        reasoning = text[: text.index("</think>")] if "</think>" in text else text
        return RefResult(self._fallback(prompt, text, n_ctx), reasoning, generated, True)
