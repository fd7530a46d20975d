"""Publishing a folder (a dataset, a bundle, a ranker): readers see the old folder or the new one, never a part.

`publishing(target)` takes a lock beside the target (a second writer is refused at once, with the first one's
pid), removes what dead writers left, yields a fresh temporary sibling to fill, then fsyncs it and swaps it into
place with one atomic rename-exchange (Linux `renameat2`, macOS `renamex_np`), so `target` is never missing, not
even for a moment, and a SIGKILL at any step leaves either the old or the new folder there in full.

Steps, in order (`PUBLISH_STEPS`): `locked` (lock held, stale leftovers removed), `filled` (the caller wrote the
temporary folder), `synced` (its files and folders fsynced), `swapped` (the new folder is the target; the old
one sits under the temporary name), `published` (old folder removed; the lock is released next). For fault
injection, `CROSSREC_PUBLISH_PAUSE=STEP[,STEP...]` stops the process (SIGSTOP) at those steps after printing
`crossrec: publishing TARGET paused at STEP (pid N)` to stderr; the tests then SIGKILL or SIGCONT it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import glob
import hashlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["publishing", "building", "PublishError", "PUBLISH_STEPS", "PAUSE_ENV", "file_sha256"]

PUBLISH_STEPS = ("locked", "filled", "synced", "swapped", "published")
PAUSE_ENV = "CROSSREC_PUBLISH_PAUSE"
# Leftovers of dead writers: ours (`tmp`), and the per-PID names earlier versions used (`partial`, `old`).
_LEFTOVERS = ("tmp", "partial", "old")


class PublishError(ValueError):
    """The target cannot be published now (another writer holds it, or it exists and may not be replaced).
    A ValueError, so the CLI reports it as one line with exit code 2."""


@contextmanager
def publishing(target: str | Path, replace: bool = True, exists_hint: str = "") -> Iterator[Path]:
    """Yields an empty temporary sibling of `target` to fill; on a clean exit it becomes `target` atomically.

    Takes the writer lock first, so a concurrent writer of the same target fails at once (before any work) with
    `PublishError`. An existing target is refused unless `replace` (the message ends with `exists_hint`). On any
    exception the temporary folder is removed and the target is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(target)
    try:
        _recover(target)
        if not replace and os.path.lexists(target):
            raise PublishError(f"{target}: already exists" + (f"; {exists_hint}" if exists_hint else ""))
        _pause("locked", target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            _pause("filled", target)
            _fsync_tree(tmp)
            _pause("synced", target)
            if os.path.lexists(target):
                _exchange(tmp, target)  # tmp now holds the old folder
                _fsync_dir(target.parent)
                _pause("swapped", target)
            else:
                _rename_noreplace(tmp, target)
                _fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _pause("published", target)
    finally:
        lock.release()


@contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """The old name of `publishing(out, replace=True)`, kept for its callers (ranker export)."""
    with publishing(out, replace=True) as tmp:
        yield tmp


# -- the lock ---------------------------------------------------------------------------------------------------
class _Lock:
    """`flock` on `.NAME.lock` beside the target. The kernel drops it when its holder dies (even by SIGKILL), so
    a lock is never stale; the file holds the holder's pid for the message and is removed on release."""

    def __init__(self, target: Path) -> None:
        self.path = target.parent / f".{target.name}.lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise PublishError(
                    f"{target} is being written by another process (pid {pid}); wait for it "
                    "to finish, or write elsewhere"
                ) from None
            # The previous holder unlinks the file before unlocking: a lock on an unlinked file locks nothing.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)


def _recover(target: Path) -> None:
    """Under the lock, whatever dead writers left beside the target is garbage, except an old folder that the
    non-atomic fallback (`_exchange` without kernel support) had moved aside when it died: it goes back."""
    for kind in _LEFTOVERS:
        for left in sorted(
            glob.glob(os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.{kind}-*"))
        ):
            if kind == "old" and not os.path.lexists(target):
                os.rename(left, target)
                continue
            shutil.rmtree(left, ignore_errors=True)


# -- durability -------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file's data and every folder's entries reach the disk before the swap makes them the target:
    otherwise a power cut after the swap could leave a published folder of empty files."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


# -- atomic renames ---------------------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_RENAME_SWAP, _RENAME_EXCL = 2, 4  # macOS sys/stdio.h
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
_renamex_np = getattr(_libc, "renamex_np", None)


def _rename2(src: Path, dst: Path, linux_flag: int, mac_flag: int) -> bool:
    """True when done; False when neither the C library nor the file system offers the flag."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), linux_flag)
    elif _renamex_np is not None:
        rc = _renamex_np(os.fsencode(src), os.fsencode(dst), mac_flag)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _exchange(tmp: Path, target: Path) -> None:
    if _rename2(tmp, target, _RENAME_EXCHANGE, _RENAME_SWAP):
        return
    # No atomic exchange here (e.g. NFS): move the old folder aside, then the new one in. A death between the two
    # leaves `.NAME.old-*` and no target; the next writer's `_recover` puts the old folder back.
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    os.rename(tmp, target)
    os.rename(old, tmp)  # where the caller removes the old folder from


def _rename_noreplace(tmp: Path, target: Path) -> None:
    # Plain rename() would silently replace an empty folder created at `target` meanwhile by a non-crossrec writer.
    if not _rename2(tmp, target, _RENAME_NOREPLACE, _RENAME_EXCL):
        if os.path.lexists(target):
            raise PublishError(f"{target}: appeared while it was being written; not replaced")
        os.rename(tmp, target)


def _pause(step: str, target: Path) -> None:
    steps = os.environ.get(PAUSE_ENV, "")
    if step in steps.split(","):
        print(f"crossrec: publishing {target} paused at {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: what a published dataset's manifest and a bundle's
    bundle.json record for each of their files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
