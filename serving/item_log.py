"""The append-only log of items accepted by `POST /v1/items`: what makes an online item durable.

One JSON line per accepted item, written (and fsync'ed) before the API answers 200, under an exclusive file lock
so that several replicas can share one log (on a cluster: a folder every node mounts). Each line carries the
text the item was embedded from and its vector with the bundle version that made it:

    {"domain": ..., "item_id": ..., "title": ..., "text": ..., "bundle": VERSION, "vector": BASE64 float32}

A replica replays the log when it starts or rolls out a bundle (the last line of an id wins; an item whose
vector came from another bundle is embedded again from its text) and, before every request, reads what other
replicas appended since (`tail`: one fstat when nothing is new). No Ray here: the deployment calls it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LogItem", "ItemLog", "LOG_NAME"]

LOG_NAME = "items.jsonl"


@dataclass
class LogItem:
    domain: str
    item_id: str
    title: str
    text: str  # what the Encoder embedded: needed again when another bundle rolls out
    bundle: str  # the bundle version whose encoder made `vector`
    vector: np.ndarray  # (V,) float32

    def line(self) -> bytes:
        v = base64.b64encode(np.ascontiguousarray(self.vector, dtype=np.float32).tobytes()).decode()
        return (
            json.dumps(
                {
                    "domain": self.domain,
                    "item_id": self.item_id,
                    "title": self.title,
                    "text": self.text,
                    "bundle": self.bundle,
                    "vector": v,
                },
                ensure_ascii=False,
            )
            + "\n"
        ).encode()

    @classmethod
    def parse(cls, line: bytes) -> LogItem:
        r = json.loads(line)
        return cls(
            domain=r["domain"],
            item_id=r["item_id"],
            title=r["title"],
            text=r["text"],
            bundle=r["bundle"],
            vector=np.frombuffer(base64.b64decode(r["vector"]), dtype=np.float32).copy(),
        )


class ItemLog:
    """`state_dir`/items.jsonl. `read_all` for a replay, `tail` for what was appended since, `append` to accept."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / LOG_NAME
        self.path.touch(exist_ok=True)
        self.offset = 0  # bytes of the log this reader has applied
        self.skipped = 0  # lines that could not be parsed (a torn write from a crash mid-append)

    def _read_from(self, offset: int) -> tuple[list[LogItem], int]:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        out = []
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                out.append(LogItem.parse(line))
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
        return out, offset + end

    def read_all(self) -> list[LogItem]:
        """Every item of the log, the last line of each (domain, item_id) only, in the order of those lines."""
        items, self.offset = self._read_from(0)
        latest: dict[tuple[str, str], LogItem] = {}
        for it in items:
            latest.pop((it.domain, it.item_id), None)
            latest[(it.domain, it.item_id)] = it
        return list(latest.values())

    def tail(self) -> list[LogItem]:
        """Lines appended (by this or another replica) since the last read; [] at the cost of one stat."""
        if os.stat(self.path).st_size <= self.offset:
            return []
        items, self.offset = self._read_from(self.offset)
        return items

    def append(self, items: list[LogItem]) -> None:
        """Durably appends `items` (one write, fsync'ed) before the caller acknowledges them."""
        data = b"".join(it.line() for it in items)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # replicas sharing the log never interleave their lines
            try:
                end = f.seek(0, os.SEEK_END)
                if end:
                    f.seek(end - 1)
                    if f.read(1) != b"\n":  # a line torn by a crash: end it, so it does not swallow ours
                        data = b"\n" + data
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
