"""Files written whole or not at all (docs/design.md, "Files that survive a crash"), as databases write them:
a file that names other files (a store's manifest, a checkpoint's `selfaug.json` and `latest`, a run's
config) goes to a temporary name unique to its writer, is fsynced, renamed over the old one, and its
directory fsynced; a directory of files (`final/`) is written beside the old one, each file fsynced, a
marker written last, and swapped in by rename. After a crash or a full disk the old file or directory is
there whole, or the new one is.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket

COMPLETE = "COMPLETE"  # the file a directory swapped in by `replace_dir` holds last: its files are whole


def tmp_name(path: str) -> str:
    """A temporary name beside `path`, unique to this writer (host, pid): two writers never share one."""
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in directory `path` survive a power loss (a no-op where the OS cannot)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory: nothing more can be done there
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: str | bytes) -> None:
    """`data` at `path`, whole or not at all: temporary name, fsync, rename, directory fsync. An OSError (a full
    disk) leaves the previous file, if any, unchanged and no temporary file behind."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(path))


def fsync_tree(path: str, mine=None) -> None:
    """fsync every file and directory under `path` (the files libraries wrote without it), or with `mine(name)` the
    files this process wrote: an fsync flushes this machine's cache, so on a network file system each writer must
    flush its own. A file renamed away meanwhile (another writer's temporary) is skipped."""
    found = sorted(os.path.join(folder, name) for folder, _, files in os.walk(path) for name in files)
    for name in found:
        if mine is None or mine(os.path.basename(name)):
            try:
                with open(name, "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:
                continue
    for folder, _, _ in os.walk(path):
        fsync_dir(folder)


def staging_dir(target: str) -> str:
    """An empty directory beside `target` to build its replacement in (`<target>.tmp-<host>-<pid>`). What earlier,
    stopped writers left beside it goes first: a writer stopped between `replace_dir`'s two renames left no
    `target`, and the whole directory it left (its complete new one, else the old one set aside) becomes `target`
    again; the rest is removed (call it while holding the directory, one writer at a time)."""
    staged_before = [d for d in glob.glob(glob.escape(target) + ".tmp-*") if is_complete(d)]
    aside_before = glob.glob(glob.escape(target) + ".old-*")  # set aside whole by replace_dir
    if not os.path.exists(target) and staged_before + aside_before:
        os.rename((staged_before + aside_before)[0], target)
        fsync_dir(os.path.dirname(target))
    for old in glob.glob(glob.escape(target) + ".tmp-*") + glob.glob(glob.escape(target) + ".old-*"):
        shutil.rmtree(old, ignore_errors=True)
    staged = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(staged)
    return staged


def replace_dir(staged: str, target: str, marker: str = "") -> None:
    """Swap the finished directory `staged` in as `target`: every file fsynced, the marker `COMPLETE` written
    last, then the old `target` renamed aside, `staged` renamed to `target`, the parent fsynced and the old one
    removed. Until the second rename the old `target` is whole where it was."""
    fsync_tree(staged)
    write_atomic(os.path.join(staged, COMPLETE), marker)
    parent = os.path.dirname(target)
    aside = None
    if os.path.exists(target):
        aside = f"{target}.old-{socket.gethostname()}-{os.getpid()}"
        os.rename(target, aside)
    try:
        os.rename(staged, target)
    except OSError:
        if aside:  # the old one back where it was
            os.rename(aside, target)
        raise
    fsync_dir(parent)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def is_complete(directory: str) -> bool:
    """`directory` was swapped in whole by `replace_dir`."""
    return os.path.isfile(os.path.join(directory, COMPLETE))
