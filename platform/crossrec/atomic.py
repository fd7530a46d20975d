"""Folders written all-or-nothing: datasets and bundles are never seen half-written."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["building"]


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out` to fill. On success it takes `out`'s place (an existing `out`
    is removed only then); on any failure it is removed and `out` is left as it was."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
