"""What every ingest adapter returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossrec.schema import SourceTable

__all__ = ["Source"]


@dataclass
class Source:
    """Tables read from one source, not yet validated (see `crossrec.schema`)."""

    items: list[SourceTable]
    interactions: list[SourceTable]
    identity: SourceTable | None = None
    description: str = ""
    # Rows an adapter skipped on purpose (e.g. reviews without a usable item), by reason: reported, never silent.
    skipped: dict[str, int] = field(default_factory=dict)
