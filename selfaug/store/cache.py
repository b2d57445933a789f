"""A rank's share of a store on object storage (docs/design.md, "Stores on object storage"): with
`train.order: shards` each rank reads a run of about n_shards / world shards per epoch, one shard after the
other (`StepSampler.shard_runs`), so it downloads only those, a few ahead of the step that reads them, into its
own folder of the node's cache, and removes each one as soon as its run is over.

`RankShards` is the store as stage 2 sees it then: the manifest and the sidecars (pulled once per node, without
the shards: the sidecars carry each example's lengths, so the plan needs no shard), and each shard opened when
the plan reaches it. `ShardCache` holds the files: a thread downloads the plan's shards in order, each checked
against its sha256 as it arrives (`remote.download`: a cut download is retried), never more than `ahead` shards
past the step being read; the reader waits only for a shard that is not there yet (`data_wait_s`). What a rank
holds at once: the shards of the step being read (one, or two where the step crosses from one to the next) plus
`ahead`. What it downloads: its share, plus the boundary shards it shares with the ranks beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections import deque

from . import remote
from .checks import INCOMPLETE, check_shard
from .files import read_manifest, read_shard
from .format import Lengths, StoreError, flatten
from .reader import TeacherStore, index_of
from .signals import signal_of


def open_share(url: str, local: str, verify: str = "sha256") -> TeacherStore:
    """The store at `url` for a run with train.order=shards: `RankShards` (each rank downloads its share), or,
    for a store whose sidecars carry no lengths (made by an older selfaug), the node's whole mirror. `local`: the
    node's mirror of it, pulled without shards (`remote.pull(url, shards=False)`: the manifest, config, sidecars)."""
    from .. import dist
    manifest = dist.decide(lambda: read_manifest(local))
    if manifest.get("status") != "complete":
        raise StoreError(f"teacher store {url}: {INCOMPLETE}")
    lengths = _sidecar_lengths(local, manifest)
    if lengths is None:
        if dist.rank_world()[0] == 0:
            print(f"{url}: its sidecars carry no per-example lengths (a store made by an older selfaug), so each node "
                  f"downloads the whole store ({manifest['totals']['bytes'] / 1e9:.2f} GB); precompute it again to "
                  "download only each rank's share", flush=True)
        return TeacherStore(remote.pull(url), verify=verify)
    return RankShards(url, local, manifest, lengths, verify)


def _sidecar_lengths(local: str, manifest: dict) -> Lengths | None:
    parts = []
    for entry in manifest["shards"]:
        try:
            with open(os.path.join(local, entry["file"][: -len(".arrow")] + ".json")) as f:
                got = json.load(f).get("lengths")
        except (OSError, ValueError):
            got = None
        if got is None or len(got["tokens"]) != entry["rows"]:
            return None
        parts.append(got)
    import numpy as np
    return Lengths(*(np.asarray([v for p in parts for v in p[k]], dtype=np.int64) for k in ("tokens", "prompt", "kl")))


class RankShards(TeacherStore):
    """A store on object storage read by one rank's plan (train.order=shards): `follow` starts its `ShardCache`;
    a shard is opened (and value-checked, its bytes checked as they arrived) when the plan reaches it, and
    dropped with its file when the plan has passed it (`begin_step`)."""

    AHEAD = 2  # shards downloaded past the step being read (SELFAUG_SHARDS_AHEAD)

    def __init__(self, url: str, local: str, manifest: dict, lengths: Lengths, verify: str):
        self.dir, self.url, self.manifest, self._lengths, self.verify = url, url, manifest, lengths, verify
        self.signal = signal_of(manifest["settings"])
        self._index = index_of(manifest, url)
        self._shards = [None] * len(manifest["shards"])
        self.work, self.cache, self.local = None, None, local

    def lengths(self) -> Lengths:
        return self._lengths

    def follow(self, sampler, rank: int, start: int, stop: int) -> None:
        if self.cache is None:
            ahead = int(os.environ.get("SELFAUG_SHARDS_AHEAD", self.AHEAD))
            self.cache = ShardCache(self.url, self.manifest, sampler.shard_runs(rank, start, stop),
                                    sampler.micro * sampler.accum, start, self.local + ".ranks", ahead)

    def begin_step(self, step: int) -> None:
        for s in self.cache.begin_step(step):
            self._shards[s] = None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _shard(self, s: int) -> dict:
        if self._shards[s] is None:
            if self.cache is None:
                raise StoreError(f"{self.url}: a shard was read before the run's plan was given (RankShards.follow)")
            entry = self.manifest["shards"][s]
            table = read_shard(self.cache.path(s))  # a compressed shard: decompressed in this rank, one at a time
            flat = flatten(table, self.signal) if table.num_rows else None
            problems = check_shard(table, self.manifest["settings"], entry["file"], flat)
            if problems:
                raise StoreError(f"teacher store {self.url}: " + "; ".join(problems))
            self._shards[s] = flat
        return self._shards[s]


class ShardCache:
    """The files of one rank's shards, in the plan's order (`runs`: (shard, first, end) stream positions, from
    `StepSampler.shard_runs`): downloaded by a thread up to `ahead` shards past the step being read, removed once
    their run is over. `stats`: what it downloaded and the most it held."""

    def __init__(self, url: str, manifest: dict, runs, per_step: int, start: int, root: str, ahead: int):
        self.fs, self.url, self.entries = remote.filesystem(url), url, manifest["shards"]
        self.runs, self.per_step, self.step, self.ahead = runs, per_step, start, ahead
        _remove_stale(root)
        self.folder = os.path.join(root, f"{socket.gethostname()}-{os.getpid()}")  # this process's: never shared
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        self.cond = threading.Condition()
        self.window: deque = deque()  # (shard, first, end) fetched or being fetched, in stream order, not yet over
        self.held: dict[int, int] = {}  # shard -> its runs in the window (its file goes when none is left)
        self.ready: set[int] = set()
        self.error, self.stopped = None, False
        self.stats = {"downloaded": [], "bytes_downloaded": 0, "most_held": 0, "most_bytes_held": 0, "ahead": ahead,
                      "wait_for_download_s": 0.0}
        self.thread = threading.Thread(target=self._work, name="selfaug-shards", daemon=True)
        self.thread.start()

    def _may_fetch(self, first: int) -> bool:
        """Always a shard the step being read needs; past that step, at most `ahead` shards."""
        end = (self.step + 1) * self.per_step
        return first < end or sum(f >= end for _, f, _ in self.window) < self.ahead

    def _work(self) -> None:
        try:
            for shard, first, end in self.runs:
                with self.cond:
                    while not self.stopped and not self._may_fetch(first):
                        self.cond.wait(1.0)
                    if self.stopped:
                        return
                    self.window.append((shard, first, end))
                    here = self.held.get(shard, 0) > 0  # a shard whose run comes back before it was removed
                    self.held[shard] = self.held.get(shard, 0) + 1
                if not here:
                    e = self.entries[shard]
                    remote.download(self.fs, self.url, self.folder, e["file"], e["sha256"], e["bytes"])
                with self.cond:
                    if not here:
                        self.stats["downloaded"].append(shard)
                        self.stats["bytes_downloaded"] += self.entries[shard]["bytes"]
                    self.ready.add(shard)
                    self.stats["most_held"] = max(self.stats["most_held"], len(self.ready))
                    self.stats["most_bytes_held"] = max(self.stats["most_bytes_held"],
                                                        sum(self.entries[s]["bytes"] for s in self.ready))
                    self.cond.notify_all()
        except BaseException as e:  # raised to the reader, at the shard it waits for
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def path(self, shard: int) -> str:
        """The local file of `shard`, once downloaded and checked (the reader waits for it here)."""
        t0 = time.perf_counter()
        with self.cond:
            while shard not in self.ready:
                if self.error is not None:
                    raise self.error
                end = (self.step + 1) * self.per_step
                if shard not in self.held and any(f >= end for _, f, _ in self.window):
                    raise StoreError(f"{self.url}: shard {shard} is not in this rank's plan at step {self.step}")
                self.cond.wait(1.0)
        self.stats["wait_for_download_s"] += time.perf_counter() - t0
        return os.path.join(self.folder, self.entries[shard]["file"])

    def begin_step(self, step: int) -> list[int]:
        """The reader is at `step`: the shards whose runs ended before it are removed; returns them."""
        gone = []
        with self.cond:
            self.step = step
            while self.window and self.window[0][2] <= step * self.per_step and self.window[0][0] in self.ready:
                shard = self.window.popleft()[0]
                self.held[shard] -= 1
                if not self.held[shard]:
                    del self.held[shard]
                    self.ready.discard(shard)
                    os.remove(os.path.join(self.folder, self.entries[shard]["file"]))
                    gone.append(shard)
            self.cond.notify_all()
        return gone

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove_stale(root: str) -> None:
    """The folders of this host's processes that are gone (a killed run leaves its shards behind)."""
    host = socket.gethostname()
    for name in os.listdir(root) if os.path.isdir(root) else ():
        who, _, pid = name.rpartition("-")
        if who == host and pid.isdigit() and not remote._alive(pid):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
