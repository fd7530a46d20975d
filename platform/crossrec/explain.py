"""Explanations in words: the instruct backbone (SmolLM2-135M-Instruct) writes one short sentence per recommended
item from the titles of the history items that contributed most to it (the occlusion reasons). Opt-in, one
batched generation per request, bounded in tokens; plain weighted reasons stay the default. No Ray."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Explainer", "EXPLAIN_BACKBONE"]

EXPLAIN_BACKBONE = "smollm2-135m"  # the registry's instruct model
_SYSTEM = "You explain product recommendations to a shopper in one short, friendly sentence."


@dataclass
class Explained:
    texts: list[str]  # one sentence per item, in order
    seconds: float  # the generation's wall time (the serving bench reports it)
    new_tokens: int  # generated tokens, all items together


class Explainer:
    """Loads the instruct model once (local files only); `explain` is one batched, greedy generation."""

    def __init__(self, backbone: str = EXPLAIN_BACKBONE, max_new_tokens: int = 32):
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

    def prompt(self, title: str, because: list[str]) -> str:
        history = "; ".join(t[:80] for t in because) or "nothing yet"
        messages = [
            {"role": "system", "content": _SYSTEM},
            {
                "role": "user",
                "content": f"The shopper liked: {history}. We recommend: {title[:100]}. "
                "In one short sentence, why might they like it?",
            },
        ]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def explain(self, items: list[tuple[str, list[str]]]) -> Explained:
        """items: (recommended title, titles of the history items behind it, strongest first) -> one sentence
        each, cut at its first sentence end."""
        import torch

        if not items:
            return Explained([], 0.0, 0)
        t0 = time.perf_counter()
        enc = self.tokenizer([self.prompt(t, b) for t, b in items], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
        texts = []
        for row in new:
            text = str(self.tokenizer.decode(row, skip_special_tokens=True)).strip()
            end = min((text.find(c) + 1 for c in ".!?" if c in text), default=len(text))
            texts.append(text[:end].strip())
        n_new = int((new != self.tokenizer.pad_token_id).sum())
        return Explained(texts, time.perf_counter() - t0, n_new)
