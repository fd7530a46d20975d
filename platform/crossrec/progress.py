"""Progress for people at a terminal and for logs: a bar with rate and ETA when stdout is a terminal, one line
per stage (when it ends) otherwise, so a CI log or `| tee` gets no wall of carriage returns. No Ray."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "interactive", "verbose"]


def interactive() -> bool:
    """stdout is a terminal (CROSSREC_PROGRESS=bar or =lines forces one way)."""
    forced = os.environ.get("CROSSREC_PROGRESS")
    if forced in ("bar", "lines"):
        return forced == "bar"
    return sys.stdout.isatty()


def verbose() -> bool:
    """`crossrec --verbose`: Ray's own logs and progress bars shown (CROSSREC_VERBOSE=1)."""
    return os.environ.get("CROSSREC_VERBOSE") == "1"


class Progress:
    """`with Progress(total, "embed", unit="item") as p: p.update(n)`; `p.status("2 running")` sets the
    bar's postfix. Disabled: silent. Not interactive: one line at the end with the count and the time."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self.t0, self.note, self.bar = 0, time.monotonic(), "", None
        if enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def status(self, note: str) -> None:
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            took = time.monotonic() - self.t0
            of = f"/{self.total}" if self.total is not None else ""
            note = f"; {self.note}" if self.note else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}s in {took:.0f}s{note}", flush=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
