"""One job per directory (docs/design.md, "One job per directory"): the exclusive lock a job holds on the
directory it writes (`selfaug train` its train.output_dir, `eval` its eval.output_dir, `study` its
study.output_dir, `precompute` its store), on rank 0. The file `.lock` says who holds it (the command, host,
pid, since); an flock on it is released by the kernel when the holder dies, so a stale lock is seen for what
it is and taken over with a message. A second job is refused in one line naming the holder, before it touches
anything. What it cannot promise: a file system where flock does not reach across machines (see
docs/troubleshooting.md).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time

from .errors import SelfAugError

LOCK = ".lock"
# what flock returns on a file system without it (Lustre mounted without -o flock, some NFS setups)
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL}
_WARNED: set[str] = set()


def flock(fd: int, flags: int, where: str = "") -> bool:
    """fcntl.flock, or False where the file system has no flock: one warning (per place), and the lock is then
    not enforced (a run goes on as it would without the guard; it never ends in a traceback). A held lock with
    LOCK_NB still raises BlockingIOError."""
    try:
        fcntl.flock(fd, flags)
        return True
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        key = os.path.dirname(where) or where
        if key not in _WARNED:
            _WARNED.add(key)
            print(f"selfaug: warning: the file system of {where or 'a lock file'} has no flock ({os.strerror(e.errno)}): "
                  "its lock is not enforced, so keep to one job per directory yourself", file=sys.stderr, flush=True)
        return False
_HELD: dict[str, list] = {}  # this process's locks, by real path: [fd, holders] (a job that runs another in-process)


class DirectoryBusy(SelfAugError, RuntimeError):
    """Another job holds the directory (the message names it: command, host, pid, since)."""


class DirLock:
    """The lock of one directory for one job (`job`: the command, e.g. "train"). acquire() takes it or raises
    `error` (one line naming the holder); release() lets it go. Taken twice by one process, it is held until
    released twice."""

    error: type = DirectoryBusy

    def __init__(self, directory: str, job: str):
        self.dir, self.job = directory, job
        self.path = os.path.join(directory, LOCK)
        self.held = False

    def busy(self, holder: str) -> str:
        return (f"{self.dir} is in use by another job ({holder}); wait for it to end, or stop it, then run this "
                "one again (nothing was changed)")

    def acquire(self) -> "DirLock":
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.path)
        except BlockingIOError:
            raise self.error(self.busy(_holder(fd))) from None
        old = os.read(fd, 4096).decode(errors="replace").strip()
        if old:  # written by a holder that never released it: the kernel dropped its flock when it died
            print(f"taking over the stale lock of {self.dir} left by a job that is gone ({old})", flush=True)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"selfaug {self.job} on host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        _HELD[key] = [fd, 1]
        self.held = True
        return self

    def check_free(self) -> None:
        """Raise `error` when another job holds the lock; only reads (a job refuses before its slow start)."""
        found = holder(self.dir)
        if found is not None:
            raise self.error(self.busy(found))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = os.path.realpath(self.path)
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.ftruncate(entry[0], 0)  # an empty lock file is a released one
            os.close(entry[0])  # closing drops the flock


def holder(directory: str) -> str | None:
    """Who holds `directory`'s lock ("selfaug train on host h, pid p, since t"), or None when no live process does
    (this process's own locks count as free). A probe with a shared flock: it reads, it never writes."""
    path = os.path.join(directory, LOCK)
    if os.path.realpath(path) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, path)
    except BlockingIOError:
        return _holder(fd)
    os.close(fd)  # closing drops the probe's flock
    return None


def _holder(fd: int) -> str:
    found = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its name yet"
    os.close(fd)
    return found


def hold(directory: str, job: str) -> DirLock | None:
    """All ranks: rank 0 takes the lock of `directory` (the lock on rank 0, None elsewhere); a refusal is raised
    on every rank alike."""
    from . import dist
    lock = DirLock(directory, job) if dist.rank_world()[0] == 0 else None

    def take() -> None:  # called on rank 0 alone
        lock.acquire()
    dist.decide(take)
    return lock
