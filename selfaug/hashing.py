"""The one file hash used for fingerprints and shard checksums (docs/design.md, "The teacher store")."""
from __future__ import annotations

import hashlib


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
