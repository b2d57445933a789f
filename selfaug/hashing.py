"""File hashes (docs/design.md, "The teacher store"; "Models"): sha256 for shard checksums, and the content
hash of a model's files, every byte of them, cached beside the files so that a large model is read once."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os

HASHES = ".selfaug-hashes.json"  # beside a model's files: each file's content hash, keyed by its stat


def sha256_file(path: str, limit: int | None = None) -> str:
    """sha256 of a file, or of its first `limit` bytes."""
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(1 << 22 if remaining is None else min(1 << 22, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def content_hash(path: str) -> str:
    """xxh3-128 of every byte of a file ("xxh3_128:HEX"): about 10 GB/s on one core, so the disk sets the pace
    (sha256 is 1 GB/s)."""
    import xxhash
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return "xxh3_128:" + h.hexdigest()


def file_hashes(directory: str, names: list[str]) -> dict[str, str]:
    """{name: content_hash} of files in `directory`, each read only when its size, mtime, ctime or inode
    differs from the cache's (`HASHES` in the directory, or under $SELFAUG_CACHE/hashes when the directory is not
    writable). One process hashes at a time (an flock beside the cache): ranks starting together read once."""
    cache = os.path.join(directory, HASHES)
    if not os.access(directory, os.W_OK):
        root = os.environ.get("SELFAUG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfaug"))
        key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:32]
        cache = os.path.join(root, "hashes", f"{key}.json")
        os.makedirs(os.path.dirname(cache), exist_ok=True)
    from .locks import flock
    # a regular file opened for writing, beside the cache: NFS refuses an exclusive flock on a read-only descriptor
    fd = os.open(cache + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flock(fd, fcntl.LOCK_EX, cache)
        try:
            with open(cache) as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = {}
        out, before = {}, dict(known)
        for name in names:
            path = os.path.join(directory, name)
            st = os.stat(path)
            stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            if not isinstance(known.get(name), dict) or known[name].get("stat") != stat:
                known[name] = {"stat": stat, "hash": content_hash(path)}
            out[name] = known[name]["hash"]
        if known != before:
            try:
                with open(cache + f".{os.getpid()}.tmp", "w") as f:
                    json.dump(known, f, indent=1)
                os.replace(cache + f".{os.getpid()}.tmp", cache)
            except OSError:  # a cache that cannot be written is only slower next time
                pass
    finally:
        os.close(fd)  # closing drops the flock
    return out


def hub_blobs(name: str, commit: str, weights: tuple) -> dict:
    """{file: "sha256:HEX"} of a Hub model's weight files in the local cache's snapshot of `commit` (the Hub's own
    content hashes: an LFS file's blob is named by its sha256); those not downloaded are absent."""
    import re
    from huggingface_hub import constants
    snapshot = os.path.join(constants.HF_HUB_CACHE, "models--" + name.replace("/", "--"), "snapshots", commit)
    found = {}
    for f in sorted(os.listdir(snapshot)) if os.path.isdir(snapshot) else []:
        blob = os.path.basename(os.readlink(os.path.join(snapshot, f))) if os.path.islink(os.path.join(snapshot, f)) else ""
        if f.endswith(weights) and re.fullmatch(r"[0-9a-f]{64}", blob):
            found[f] = "sha256:" + blob
    return found


def changed_files(old: dict | None, new: dict | None) -> str:
    """What differs between two {name: hash} maps, in words: "model.safetensors changed; x added; y removed"."""
    old, new = old or {}, new or {}
    parts = [(", ".join(sorted(names)) + " " + what) for what, names in (
        ("changed", [n for n in new if n in old and old[n] != new[n]]), ("added", [n for n in new if n not in old]),
        ("removed", [n for n in old if n not in new])) if names]
    return "; ".join(parts) or "the same files"
