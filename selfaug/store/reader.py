"""Reading a store (docs/design.md, "Reading"): `TeacherStore`, memory-mapped access to a checked store
for stage 2: example i -> its tokens, positions and the signal's arrays.

Opening costs each rank 1/world of the checks (`checks.verify_shared`): shard s is hashed and
value-checked by rank s mod world, the problems gathered, so every rank raises the same line. The
shards are memory-mapped: a rank reads a shard's teacher columns from disk only where it checks them
or an example is read.
"""
from __future__ import annotations

import os

import numpy as np

from .checks import check_shard, verify_shared
from .files import read_shard
from .format import Lengths, StoreError, flatten
from .signals import signal_of


class TeacherStore:
    """A verified store, memory-mapped: `example(i)`, `lengths()`, `signal` (the store's signal object)
    and `work` (what this rank checked when it was opened)."""

    def __init__(self, store_dir: str, verify: str = "sha256"):
        self.dir = store_dir
        opened = {}  # this rank's share of the shards: read and flattened once, for the check and for reading

        def shard(manifest, entry):  # a compressed store: mapped from the node's decompressed copy
            path = os.path.join(store_dir, entry["file"])
            if manifest["settings"].get("compression", "none") == "none":
                return read_shard(path)
            st = os.stat(path)  # the copy is of these bytes: a rewritten shard (new mtime) gets a new one
            return read_shard(path, f"{entry.get('sha256', 'x')[:32]}-{st.st_size}-{st.st_mtime_ns}")

        def check(manifest, s, entry):
            table = shard(manifest, entry)
            opened[s] = (table, flatten(table, signal_of(manifest["settings"])) if table.num_rows else None)
            return check_shard(table, manifest["settings"], entry["file"], opened[s][1])

        self.manifest, problems, self.work = verify_shared(store_dir, verify, values=True, shard_check=check)
        if problems:
            raise StoreError(f"teacher store {store_dir} failed verification: " + "; ".join(problems)
                             + ". Re-run `selfaug precompute` (it rewrites the shards that fail).")
        self.signal = signal_of(self.manifest["settings"])
        self._shards = []  # per shard: dict of numpy arrays (views of the memory map)
        for s, entry in enumerate(self.manifest["shards"]):
            if s not in opened:
                table = shard(self.manifest, entry)
                opened[s] = (table, flatten(table, self.signal) if table.num_rows else None)
            self._shards.append(opened.pop(s)[1])  # an empty shard holds no examples
        self._index = index_of(self.manifest, store_dir)

    def __len__(self) -> int:
        return len(self._index)

    def shard_rows(self) -> list[int]:
        """Examples per shard, in store order (train.order=shards plans with them)."""
        return [int(e["rows"]) for e in self.manifest["shards"]]

    def follow(self, sampler, rank: int, start: int, stop: int) -> None:
        """Reading by `sampler`'s plan from step `start` (a store whose shards are all here needs nothing)."""

    def begin_step(self, step: int) -> None:
        """The reader is at optimizer step `step` (a store whose shards are all here keeps them)."""

    def close(self) -> None:
        pass

    def _shard(self, s: int) -> dict:
        return self._shards[s]

    def example(self, i: int) -> dict:
        s, r = self._index[i]
        sh = self._shard(s)
        a, b = sh["tok_off"][r], sh["tok_off"][r + 1]
        c, d = sh["pos_off"][r], sh["pos_off"][r + 1]
        return {"example_id": int(sh["example_id"][r]), "input_ids": sh["input_ids"][a:b],
                "prompt_len": int(sh["prompt_len"][r]), "positions": sh["positions"][c:d],
                **self.signal.slice(sh, c, d)}

    def lengths(self) -> Lengths:
        """Lengths per example, without touching the teacher columns."""
        parts = [(np.diff(sh["tok_off"]), sh["prompt_len"], np.diff(sh["pos_off"])) for sh in self._shards if sh]
        return Lengths(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3)))


def index_of(manifest: dict, store_dir: str) -> np.ndarray:
    """(shard, row) of each example, in store order; a store that holds none is one line."""
    rows = [int(e["rows"]) for e in manifest["shards"]]
    if not sum(rows):
        lg = manifest.get("long_examples", {})
        raise StoreError(f"teacher store {store_dir} holds no examples: {lg.get('skipped', '?')} of "
                         f"{manifest['totals']['records']} records were skipped by data.long_policy="
                         f"{lg.get('policy')} (max_seq_len={lg.get('max_seq_len')})"
                         + (f" and {lg['unanswered']} had no answer" if lg.get("unanswered") else "")
                         + "; raise data.max_seq_len or use long_policy=truncate, then precompute again")
    shard = np.repeat(np.arange(len(rows), dtype=np.int64), rows)
    return np.stack([shard, np.arange(len(shard), dtype=np.int64) - np.repeat(np.cumsum([0] + rows[:-1]), rows)], 1)
