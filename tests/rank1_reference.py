"""An independent reference of the rank1 protocol in transformers (fp32, greedy), for the tests.

Written from the official code's rules (orionw/rank1, `rank1.py`) on its own — it shares no code with rank1_local.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATE = ("Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
            "Query: {query}\nPassage: {passage}\n<think>")


@dataclass
class RefResult:
    score: float
    reasoning: str
    n_tokens: int
    forced: bool


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

    def score(self, query, passage, max_think_tokens=1024, rethink_rounds=0) -> RefResult:
        prompt = TEMPLATE.format(query=query, passage=passage)
        ids = self.tok.encode(prompt)
        context = list(ids)
        generated = 0
        base, new_tokens = "", []  # text = base + decode(new_tokens); base changes on rethink
        text = ""
        while True:
            token = int(self._next_logits(context).argmax())
            if token == self.tok.eos_token_id or token in self.tok.all_special_ids:
                break
            context.append(token)
            new_tokens.append(token)
            generated += 1
            text = base + self.tok.decode(new_tokens)
            if "</think>" in text:
                if rethink_rounds > 0:
                    rethink_rounds -= 1
                    base, new_tokens = text[: text.index("</think>")] + "\nWait", []
                    text = base
                    context = self.tok.encode(prompt + base)
                    continue
                score = self._score(self._next_logits(context))
                return RefResult(score, text[: text.index("</think>")], generated, False)
            if generated >= max_think_tokens:
                break
        # forced answer: cut back to the last sentence end, close the reasoning
        if text and text[-1] not in ".!?":
            last = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
            cut = text[: last + 1] if last >= 0 else ""
        else:
            cut = text
        forced_ids = self.tok.encode(prompt + "\n" + cut + "\n</think>")
        return RefResult(self._score(self._next_logits(forced_ids)), text, generated, True)
