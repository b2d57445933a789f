"""The store's files (docs/design.md, "The teacher store"): shards and JSON written whole or not at
all (`durable`: a temporary name unique to the writer, fsync, rename, the directory fsynced), the manifest
read and checked for its format and version, shards memory-mapped, and the lock of the one precompute
writing a store.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
import time

import pyarrow as pa

from ..durable import fsync_dir, tmp_name, write_atomic
from ..hashing import sha256_file
from ..locks import flock
from .format import FORMAT, MANIFEST, VERSION, StoreError


def write_shard(path: str, table: pa.Table, compression: str = "none") -> dict:
    """Write under a temporary name, fsync, rename: a shard file is either whole or absent."""
    tmp = tmp_name(path)
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    try:
        with pa.OSFile(tmp, "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise StoreError(f"could not write shard {path} ({e.strerror or e}); nothing claims it is written: "
                             "fix the cause and run precompute again (the finished shards are kept)") from None
        free = shutil.disk_usage(os.path.dirname(path)).free
        raise StoreError(f"no space left on the device holding {os.path.dirname(path)}: this shard needs about "
                         f"{table.nbytes / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; free space and run "
                         "precompute again (the finished shards are kept)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"file": os.path.join("shards", os.path.basename(path)), "rows": table.num_rows,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def write_json_atomic(path: str, obj: dict) -> None:
    try:
        write_atomic(path, json.dumps(obj, indent=2))
    except OSError as e:
        raise StoreError(f"could not write {path} ({e.strerror or e}); the previous file, if any, is unchanged: "
                         "fix the cause and run the command again") from None


class TornManifest(StoreError):
    """The manifest is missing beside shards, empty or torn: it can be rebuilt from the shards that verify."""


def rebuild_hint(store_dir: str) -> str:
    return (f"run the same `selfaug precompute` again, or `selfaug inspect --repair {store_dir}`: the manifest is "
            "rebuilt from the shards that verify (none is computed again)")


def read_manifest(store_dir: str) -> dict:
    path = os.path.join(store_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(store_dir, "shards")):
            raise TornManifest(f"{store_dir} has shards but no {MANIFEST}: {rebuild_hint(store_dir)}")
        raise StoreError(f"{store_dir} is not a teacher store (no {MANIFEST}); run `selfaug precompute` first")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TornManifest(f"{path} is not valid JSON ({e}): {rebuild_hint(store_dir)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT} manifest; point teacher.output_dir at a teacher store or an empty "
                         "directory")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{path}: store format version {manifest.get('version')} is not {VERSION}; recompute it")
    return manifest


def read_shard(path: str, decompressed_key: str | None = None) -> pa.Table:
    """The shard's table over a memory map: uncompressed columns are views of the file, read from disk
    only where touched. A compressed shard (`teacher.compression`) would be decompressed whole into each reading
    process's memory (8 copies on a node of 8 ranks): with `decompressed_key` (naming its bytes) it is mapped from the
    node's one decompressed copy instead (`decompressed_copy`)."""
    if decompressed_key is not None:
        path = decompressed_copy(path, decompressed_key)
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


def decompressed_copy(path: str, key: str) -> str:
    """An uncompressed copy of a compressed shard in this node's cache (`$SELFAUG_CACHE/shards/<key>.arrow`, `key`
    the shard's sha256): made once per node, batch by batch, under a file lock (the node's other ranks wait for it,
    then map it too), so the page cache holds one decompressed copy per node. `key` names the bytes (the reader
    uses sha256, size and mtime). Remove the folder to reclaim the space."""
    import fcntl
    from ..data import cache_dir
    folder = os.path.join(cache_dir(), "shards")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{key}.arrow")
    if os.path.exists(target):
        return target
    with open(target + ".lock", "a") as lock:
        flock(lock.fileno(), fcntl.LOCK_EX, target)
        if not os.path.exists(target):
            for stale in glob.glob(glob.escape(target) + ".*.tmp"):  # a copy stopped midway
                os.remove(stale)
            tmp = tmp_name(target)
            with pa.memory_map(path) as source:
                reader = pa.ipc.open_stream(source)
                with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
                    for batch in reader:  # one record batch in memory at a time
                        writer.write_batch(batch)
            with open(tmp, "rb") as f:  # whole on disk before its name says so
                os.fsync(f.fileno())
            os.replace(tmp, target)
    return target


class StoreLock:
    """An exclusive lock on a store directory, held by rank 0 of the one precompute writing it: the
    file `.lock` says who holds it (host, pid, since), and an flock on it is released by the kernel when
    the holder dies, so a stale lock is detected and taken over (with a message)."""

    def __init__(self, store_dir: str):
        self.path = os.path.join(store_dir, ".lock")
        self.fd = None

    def acquire(self) -> None:
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.path)
        except BlockingIOError:
            self._busy(fd)
        old = os.read(fd, 4096).decode(errors="replace").strip()
        if old:
            print(f"taking over the stale lock of {os.path.dirname(self.path)} left by a precompute that is gone "
                  f"({old})", flush=True)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        self.fd = fd

    def check_free(self) -> None:
        """Refuse at once when another precompute holds the lock (called before the model loads; the lock is
        taken when the directory is prepared). It only reads: a probe with a shared flock."""
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, self.path)
        except BlockingIOError:
            self._busy(fd)
        os.close(fd)  # closing drops the probe's flock

    def _busy(self, fd: int) -> None:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"another precompute is writing {os.path.dirname(self.path)} ({holder}); wait for it "
                         "to finish, or stop it, then run this one again (it resumes from the finished shards)")

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file is a released one
            os.close(self.fd)  # closing drops the flock
            self.fd = None
