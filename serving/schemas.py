"""The HTTP contract of the serving graph (DESIGN.md "HTTP API") as pydantic models, and the limits it enforces.

Every bad input is answered 4xx with a message that names the field: pydantic names it for shape errors,
the ingress names it for what only the catalog knows (unknown domain or item id, `k` beyond the domain).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HISTORY",
    "MAX_K",
    "MAX_TEXTS",
    "HistoryEntry",
    "RecommendRequest",
    "Reason",
    "Item",
    "RecommendResponse",
    "NewItem",
    "ItemsRequest",
    "ItemsResponse",
]

MAX_BODY_BYTES = 1024 * 1024  # larger bodies get 413 before they are parsed
MAX_HISTORY = 500  # the user tower reads the last `max_len` entries anyway; more is a client bug
MAX_K = 100
MAX_TEXT = 4000  # characters of one text (the backbone keeps `max_tokens` tokens of it)
MAX_ITEMS = 256  # items per POST /v1/items
# Texts (history entries with `text`, and `query`) per recommend request: each costs a backbone pass on the
# Encoder (~5 ms of a core), so an unbounded list is an easy way to stall every other request.
MAX_TEXTS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


class HistoryEntry(_Strict):
    domain: str = Field(min_length=1, max_length=200, description="the entry's domain")
    item_id: str | None = Field(None, min_length=1, max_length=200, description="a catalog item of `domain`")
    text: str | None = Field(
        None, min_length=1, max_length=MAX_TEXT, description="an item known only by its text (embedded by the Encoder)"
    )
    rating: float | None = Field(
        None,
        allow_inf_nan=False,
        description="the user's rating of the entry (0-10 scale, rounded); read by bundles trained with "
        "`behaviour.rating: feature`, which read a missing one as unrated",
    )

    @model_validator(mode="after")
    def _one_of(self) -> HistoryEntry:
        if (self.item_id is None) == (self.text is None):
            raise ValueError("give exactly one of `item_id` or `text`")
        return self


class RecommendRequest(_Strict):
    user_id: str | None = Field(None, max_length=200, description="echoed for logs; no profile is stored")
    history: list[HistoryEntry] = Field(
        default_factory=list, max_length=MAX_HISTORY, description="oldest first; domains may mix"
    )
    domain: str = Field(min_length=1, max_length=200, description="domain to recommend from")
    k: int = Field(10, ge=1, le=MAX_K, description="items to return")
    exclude_seen: bool = Field(True, description="leave out items of the history")
    explain: bool = Field(False, description="per item, the history entries that contributed most")
    query: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT,
        description="free text of the user's intent, read as the newest history entry",
    )

    @model_validator(mode="after")
    def _something_to_go_on(self) -> RecommendRequest:
        if not self.history and self.query is None:
            raise ValueError("`history` is empty and there is no `query`: give at least one of them")
        return self


class Reason(BaseModel):
    item_id: str  # a history item id, `history[i]` for a text-only entry, or `query`
    domain: str
    weight: float  # score lost when this entry is left out


class Item(BaseModel):
    item_id: str
    domain: str
    title: str
    score: float
    reasons: list[Reason] | None = None


class RecommendResponse(BaseModel):
    items: list[Item]
    model: str  # the bundle version that answered


class NewItem(_Strict):
    item_id: str = Field(min_length=1, max_length=200)
    domain: str = Field(min_length=1, max_length=200, description="one of the bundle's domains")
    title: str = Field(min_length=1, max_length=MAX_TEXT)
    text: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT,
        description="text to embed (default: rendered from `title` by the bundle's template)",
    )


class ItemsRequest(_Strict):
    items: list[NewItem] = Field(min_length=1, max_length=MAX_ITEMS)


class ItemsResponse(BaseModel):
    added: list[str]
    updated: list[str]
    model: str
