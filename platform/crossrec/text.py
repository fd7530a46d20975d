"""Item text: how an item row becomes the string a backbone reads.

Format: the `template` rendered with the row's columns, then each `extras` column the row has and the template
does not already use, as `Label: value`, all joined by "; " with empty parts skipped:

    Mae Ploy Thai Green Curry Paste - 14 oz jar; Brand: Mae Ploy; Categories: Grocery, Curry Pastes

The title stays unlabelled (it is the text a sentence encoder reads best); whitespace runs, newlines included,
collapse to one space.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TextTemplate", "render_items", "truncate_by_tokens"]

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class TextTemplate:
    """How item rows are rendered to text (see the module docstring for the format)."""

    template: str = "{title}"  # str.format-style; placeholders name item columns
    extras: tuple[str, ...] = ("brand", "categories", "attributes", "description")  # appended when present
    max_tokens: int = 64  # backbone tokens kept per item (applied when `render_items` gets a tokenizer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", tuple(self.extras))  # accept a list from YAML
        if self.max_tokens <= 0:
            raise ValueError(f"`max_tokens` must be > 0, got {self.max_tokens}")
        _ = self.placeholders  # parse now: a malformed template fails at construction

    @property
    def placeholders(self) -> list[str]:
        """Column names the template uses, in order of first use."""
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise ValueError(f"`template` is not a valid format string ({e}): {self.template!r}") from None
        for f in fields:
            if not f.isidentifier():
                raise ValueError(
                    f"`template` placeholder {{{f}}} must be a plain column name, as in '{{title}}': {self.template!r}"
                )
        return list(dict.fromkeys(fields))

    @property
    def columns(self) -> list[str]:
        """Every column rendering may read: placeholders, then extras."""
        return list(dict.fromkeys([*self.placeholders, *self.extras]))


def _value(v: Any) -> str:
    if hasattr(v, "tolist") and not isinstance(v, str):  # numpy scalars and arrays (Ray Data numpy batches)
        v = v.tolist()
    if v is None or (isinstance(v, float) and v != v):  # None, NaN
        return ""
    if isinstance(v, (list, tuple)):  # e.g. categories as a list of strings
        v = ", ".join(s for s in (_value(x) for x in v) if s)
    return _WS.sub(" ", str(v)).strip()


def _is_feature(t: pa.DataType) -> bool:
    """A list<number> column: a feature vector (e.g. an image embedding), not text."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and not (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    )


def _text_columns(rows: Mapping[str, Sequence[Any]] | pa.Table | pa.RecordBatch) -> tuple[list[str], int]:
    """Names of the columns that hold text (feature vectors left out) and the row count."""
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        return [f.name for f in rows.schema if not _is_feature(f.type)], rows.num_rows
    if not isinstance(rows, Mapping):
        raise TypeError(f"rows must be a mapping of column -> values or a pyarrow Table, got {type(rows).__name__}")
    lengths = {name: len(col) for name, col in rows.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"item columns differ in length: {lengths}")
    # A 2-D numpy column is a batch of feature vectors.
    return [c for c, col in rows.items() if getattr(col, "ndim", 1) == 1], next(iter(lengths.values()), 0)


def render_items(
    rows: Mapping[str, Sequence[Any]] | pa.Table | pa.RecordBatch,
    template: TextTemplate | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[str]:
    """Item rows (a column mapping such as a Ray Data numpy batch, or a pyarrow Table/RecordBatch) -> one text
    per row. With a tokenizer, texts are cut to `template.max_tokens` tokens."""
    template = template or TextTemplate()
    available, n = _text_columns(rows)
    for name in template.placeholders:
        if name not in available:
            raise ValueError(
                f"template placeholder {{{name}}} is not an item column (available: {', '.join(available)})"
            )
    used = set(template.placeholders)
    extras = [c for c in template.extras if c in available and c not in used]
    needed = [*template.placeholders, *extras]
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        cols = {c: rows.column(c).to_pylist() for c in needed}
    else:
        cols = {c: rows[c] for c in needed}
    labels = {c: c.replace("_", " ").capitalize() for c in extras}
    texts = []
    for r in range(n):
        head = _WS.sub(" ", template.template.format(**{c: _value(cols[c][r]) for c in template.placeholders}))
        parts = [head.strip()]
        parts += [f"{labels[c]}: {v}" for c in extras if (v := _value(cols[c][r]))]
        texts.append("; ".join(p for p in parts if p))
    if tokenizer is not None:
        # A cut can land right after a "; " separator: drop it.
        texts = [t.rstrip("; ") for t in truncate_by_tokens(texts, tokenizer, template.max_tokens)]
    return texts


def truncate_by_tokens(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[str]:
    """Cuts each text to its first `max_tokens` tokens (special tokens not counted), at a token boundary of the
    original string (character offsets from a fast tokenizer, else decoding the kept ids). Texts already short
    enough come back unchanged; a cut text re-tokenizes to at most `max_tokens` tokens."""
    if max_tokens <= 0:
        raise ValueError(f"`max_tokens` must be > 0, got {max_tokens}")
    texts = list(texts)
    if not texts:
        return []
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    out = []
    for i, text in enumerate(texts):
        ids = enc["input_ids"][i]
        if len(ids) <= max_tokens:
            out.append(text)
            continue
        keep = max_tokens
        while True:  # a cut prefix may tokenize differently from the same prefix inside the whole text
            if fast:
                cut = text[: enc["offset_mapping"][i][keep - 1][1]].rstrip()
            else:
                cut = str(tokenizer.decode(ids[:keep], skip_special_tokens=True)).rstrip()
            if keep == 1 or len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= max_tokens:
                break
            keep -= 1
        out.append(cut)
    return out
