"""Explanations in words: the instruct backbone (SmolLM2-135M-Instruct) writes one short sentence per recommended
item from the titles of the history items that contributed most to it (the occlusion reasons). Opt-in, one
batched generation per request, bounded in tokens; plain weighted reasons stay the default. No Ray.

Each answer is started for the model ("Because you liked <strongest history item>, "), so every sentence names the
history behind it and the model only finishes one clause; a row stops at its first sentence end (the batch stops
when every row has one), and a row that reaches the token bound is cut at its last whole word and ended, so no
sentence stops mid-word."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

__all__ = ["Explainer", "EXPLAIN_BACKBONE", "short_title", "finish_sentence", "DEFAULT_TOKENS"]

EXPLAIN_BACKBONE = "smollm2-135m"  # the registry's instruct model
DEFAULT_TOKENS = 24  # per sentence; measured cost in docs/RESULTS.md "Operations (issue 25)"
_SYSTEM = "You explain product recommendations to a shopper in one short, friendly sentence."
# A sentence end: . ! or ? followed by a space, or last with no digit before it ("2." may go on as "2.29").
_END = re.compile(r"[.!?](?=\s)|(?<!\d)[.!?]$")
# Words a sentence cut at the token bound must not end on.
_DANGLING = frozenset("a an and are as at but by for from in is it its of on or that the their this to with".split())


def short_title(title: str, words: int = 6) -> str:
    """A history title as a sentence can carry it: up to its first comma, dash or bracket, at most `words` words."""
    head = re.split(r"\s*[,(\[|]\s*|\s+-\s+", title.strip(), maxsplit=1)[0]
    return " ".join(head.split()[:words]) or title.strip()


def finish_sentence(text: str, cut: bool = False) -> str:
    """`text` up to its first sentence end; without one, ended with a period after trailing connectives and
    punctuation are dropped, and, when the token bound `cut` it, after its last (maybe partial) word is dropped."""
    text = " ".join(text.split())
    end = _END.search(text)
    if end:
        return text[: end.end()]
    words = text.split(" ")[:-1] if cut else text.split(" ")
    while words and words[-1].lower().strip(",;:-") in _DANGLING:
        words.pop()
    return " ".join(words).rstrip(",;:- ") + "."


@dataclass
class Explained:
    texts: list[str]  # one sentence per item, in order
    seconds: float  # the generation's wall time (the serving bench reports it)
    new_tokens: int  # generated tokens, all items together


class Explainer:
    """Loads the instruct model once (local files only); `explain` is one batched, greedy generation."""

    def __init__(self, backbone: str = EXPLAIN_BACKBONE, max_new_tokens: int = DEFAULT_TOKENS):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from crossrec.backbones import prepare_backbone

        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        transformers.utils.logging.disable_progress_bar()
        spec = prepare_backbone(backbone)
        if spec.kind != "decoder":
            raise ValueError(f"explanations in words need an instruct decoder backbone, {backbone!r} is an encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generation continues every prompt from its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True).eval()
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def opening(because: list[str]) -> str:
        """The start of the answer, written for the model: it names the strongest history item."""
        return f"Because you liked {short_title(because[0])}," if because else "For a new shopper,"

    def prompt(self, title: str, because: list[str]) -> str:
        history = "; ".join(short_title(t) for t in because) or "nothing yet"
        messages = [
            {"role": "system", "content": _SYSTEM},
            {
                "role": "user",
                "content": f"The shopper liked: {history}. We recommend: {short_title(title, 10)}. "
                "In one short sentence, why might they like it?",
            },
        ]
        chat = str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return chat + self.opening(because)

    def explain(self, items: list[tuple[str, list[str]]]) -> Explained:
        """items: (recommended title, titles of the history items behind it, strongest first) -> one whole
        sentence each, naming the first history item (see the module's docstring)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if not items:
            return Explained([], 0.0, 0)
        t0 = time.perf_counter()
        enc = self.tokenizer([self.prompt(t, b) for t, b in items], return_tensors="pt", padding=True)
        start, decode = enc["input_ids"].shape[1], self.tokenizer.batch_decode

        class _SentenceEnd(StoppingCriteria):
            """A row is done at its first sentence end; generate() pads finished rows and stops when all are."""

            def __call__(self, input_ids, scores, **kwargs):  # (B, L) -> (B,) bool
                texts = decode(input_ids[:, start:], skip_special_tokens=True)
                return torch.tensor([bool(_END.search(t.strip())) for t in texts], device=input_ids.device)

        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_SentenceEnd()]),
            )
        new = out[:, start:]  # (B, <= max_new_tokens)
        pad = self.tokenizer.pad_token_id
        texts = [
            finish_sentence(
                f"{self.opening(b)} {str(self.tokenizer.decode(row, skip_special_tokens=True)).strip()}",
                cut=len(row) == self.max_new_tokens and int(row[-1]) != pad,  # stopped by the bound, not by EOS
            )
            for (_, b), row in zip(items, new)
        ]
        n_new = int((new != self.tokenizer.pad_token_id).sum())
        return Explained(texts, time.perf_counter() - t0, n_new)
