"""A rank's share of a store on object storage (docs/design.md, "Stores on object storage"): with
`train.order: shards` each rank reads a run of about n_shards / world shards per epoch, one shard after the
other (`StepSampler.shard_runs`), so it downloads only those, a few ahead of the step that reads them, into its
own folder of the node's cache, and removes each one as soon as its run is over.

`RankShards` is the store as stage 2 sees it then: the manifest and the sidecars (pulled once per node, without
the shards: the sidecars carry each example's lengths, so the plan needs no shard), and each shard opened when
the plan reaches it. `ShardCache` holds the files: a thread downloads the plan's shards in order, each checked
against its sha256 as it arrives (`remote.download`: a cut download is retried), never more than `ahead` shards
past the step being read; the reader waits only for a shard that is not there yet (`data_wait_s`). What a rank
holds at once: the shards of the step being read (ceil(micro x accum / rows per shard) + 1 at most: usually one,
or two where the step crosses from one to the next) plus `ahead`. What it downloads: its share, plus the boundary
shards it shares with the ranks beside it.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections import deque

import numpy as np

from ..durable import write_atomic
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
    lengths = dist.together(lambda: _sidecar_lengths(local, manifest))  # a failure on one node ends every rank
    if not all(dist.all_gather_object(lengths is not None)):  # one decision for all ranks: the same collectives next
        if dist.rank_world()[0] == 0:
            print(f"{url}: its sidecars carry no per-example lengths (a store made by an older selfaug), so each node "
                  f"downloads the whole store ({manifest['totals']['bytes'] / 1e9:.2f} GB); precompute it again to "
                  "download only each rank's share", flush=True)
        return TeacherStore(dist.together(lambda: remote.pull(url)), verify=verify)
    return RankShards(url, local, manifest, lengths, verify)


def _sidecar_lengths(local: str, manifest: dict) -> Lengths | None:
    parts = []
    for entry in manifest["shards"]:
        try:
            with open(os.path.join(local, entry["file"][: -len(".arrow")] + ".json")) as f:
                side = json.load(f)
            got = side.get("lengths")  # of the shard the manifest names (its sha256), and of each of its rows
            if got is None or side.get("sha256") != entry["sha256"] or \
                    any(len(got[k]) != entry["rows"] for k in ("tokens", "prompt", "kl")):
                return None
        except (OSError, ValueError, AttributeError, KeyError, TypeError):  # unreadable or not a sidecar's shape
            return None
        parts.append(got)
    return Lengths(*(np.asarray([v for p in parts for v in p[k]], dtype=np.int64) for k in ("tokens", "prompt", "kl")))


class RankShards(TeacherStore):
    """A store on object storage read by one rank's plan (train.order=shards): `follow` starts its `ShardCache`;
    a shard is opened (and value-checked, its bytes checked as they arrived) when the plan reaches it, and
    dropped with its file when the plan has passed it (`begin_step`)."""

    AHEAD = 2  # shards downloaded past the step being read, by default

    @classmethod
    def ahead(cls) -> int:
        """Shards downloaded past the step being read: $SELFAUG_SHARDS_AHEAD, or AHEAD; a bad value is one line."""
        value = os.environ.get("SELFAUG_SHARDS_AHEAD", str(cls.AHEAD))
        if not value.strip().isdigit():
            raise StoreError(f"SELFAUG_SHARDS_AHEAD={value!r}: the shards a rank downloads ahead of its step, a whole "
                             f"number >= 0 (unset: {cls.AHEAD})")
        return int(value)

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
            self.cache = ShardCache(self.url, self.manifest, sampler.shard_runs(rank, start, stop),
                                    sampler.micro * sampler.accum, start, self.local + ".ranks", self.ahead())

    def begin_step(self, step: int) -> None:
        for s in self.cache.begin_step(step):
            self._shards[s] = None

    def _index_range(self, s: int) -> tuple[int, int]:
        first = int(np.searchsorted(self._index[:, 0], s))
        return first, first + int(self.manifest["shards"][s]["rows"])

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def report(self, run_dir: str, rank: int) -> None:
        """What this rank downloaded and held: `RUN/shards.rank-R.json` and one line."""
        if self.cache is None:
            return
        got = {**self.cache.stats, "shards": len(self.manifest["shards"]), "store_bytes": self.manifest["totals"]["bytes"]}
        write_atomic(os.path.join(run_dir, f"shards.rank-{rank}.json"), json.dumps(got))
        print(f"rank {rank}: downloaded {len(got['downloaded'])} of {got['shards']} shards "
              f"({got['bytes_downloaded'] / 1e6:.1f} of {got['store_bytes'] / 1e6:.1f} MB), at most {got['most_held']} "
              f"held at once ({got['most_bytes_held'] / 1e6:.1f} MB), {got['wait_for_download_s']:.2f} s waiting for "
              "them", flush=True)

    def _shard(self, s: int) -> dict:
        if self._shards[s] is None:
            if self.cache is None:
                raise StoreError(f"{self.url}: a shard was read before the run's plan was given (RankShards.follow)")
            entry = self.manifest["shards"][s]
            table = read_shard(self.cache.path(s))  # a compressed shard: decompressed in this rank, one at a time
            flat = flatten(table, self.signal) if table.num_rows else None
            problems = check_shard(table, self.manifest["settings"], entry["file"], flat)
            if flat is not None and not problems:  # the plan was made from the sidecar's lengths: they must be these
                a, b = self._index_range(s)
                if not (np.array_equal(np.diff(flat["tok_off"]), self._lengths.tokens[a:b])
                        and np.array_equal(flat["prompt_len"], self._lengths.prompt[a:b])
                        and np.array_equal(np.diff(flat["pos_off"]), self._lengths.kl[a:b])):
                    problems = [f"{entry['file']}: its examples' lengths differ from its sidecar's, which planned the "
                                "steps: the sidecar is damaged (the shard's own bytes match the manifest); train with "
                                "train.order=global, which reads the shards alone, or precompute the store into a new "
                                "teacher.output_dir"]
            if problems:
                raise StoreError(f"teacher store {self.url}: " + "; ".join(problems))
            self._shards[s] = flat
        return self._shards[s]


class ShardCache:
    """The files of one rank's shards, in the plan's order (`runs`: (shard, first, end) stream positions, from
    `StepSampler.shard_runs`): downloaded by a thread up to `ahead` shards past the step being read, removed once
    their run is over. `stats`: what it downloaded and the most it held. A download that fails is tried again for
    about two minutes (`ATTEMPTS`, doubling waits): one slow answer from the bucket hours into a run must not end it."""

    ATTEMPTS, BACKOFF_S = 8, 1.0  # waits of 1, 2, 4 .. 64 s between the attempts (with jitter)

    def __init__(self, url: str, manifest: dict, runs, per_step: int, start: int, root: str, ahead: int):
        self.fs, self.url, self.entries = remote.filesystem(url), url, manifest["shards"]
        self.runs, self.per_step, self.step, self.ahead = runs, per_step, start, ahead
        _remove_stale(root)
        # this process's own folder (a uuid: containers may share a host name and pids), alive while its flock is held
        self.folder = os.path.join(root, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.folder)
        new = os.path.join(self.folder, ".alive.new")  # locked before it has the name another process looks for
        self._alive = open(new, "w")
        try:
            fcntl.flock(self._alive.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, os.path.join(self.folder, ".alive"))
        except OSError:  # a filesystem without flock: no .alive, so no other process removes it; close() does
            pass
        self.cond = threading.Condition()
        self.window: deque = deque()  # (shard, first, end) fetched or being fetched, in stream order, not yet over
        self.held: dict[int, int] = {}  # shard -> its runs in the window (its file goes when none is left)
        self.ready: set[int] = set()
        self.error, self.stopped, self.finished = None, False, False
        self._stop = threading.Event()  # set by close(): a download waiting to try again gives up
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
                    remote.download(self.fs, self.url, self.folder, e["file"], e["sha256"], e["bytes"],
                                    attempts=self.ATTEMPTS, wait=lambda a: self.BACKOFF_S * 2 ** (a - 1) *
                                    (1 + 0.25 * random.random()), stop=self._stop)
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
        finally:  # the plan's end, an error or close(): a reader waiting for a shard that will not come is told
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def path(self, shard: int) -> str:
        """The local file of `shard`, once downloaded and checked (the reader waits for it here)."""
        t0 = time.perf_counter()
        with self.cond:
            while shard not in self.ready:
                if self.error is not None:
                    raise self.error
                if self.stopped:
                    raise StoreError(f"{self.url}: shard {shard} was asked for after the rank's downloads were closed")
                end = (self.step + 1) * self.per_step
                if shard not in self.held and (self.finished or any(f >= end for _, f, _ in self.window)):
                    raise StoreError(f"{self.url}: shard {shard} is not in this rank's plan at step {self.step}")
                self.cond.wait(1.0)
        self.stats["wait_for_download_s"] += time.perf_counter() - t0
        return os.path.join(self.folder, self.entries[shard]["file"])

    def begin_step(self, step: int) -> list[int]:
        """The reader is at `step`: the shards whose runs ended before it are removed; returns them. The plan only
        goes forward (a shard removed is not downloaded again for an earlier step)."""
        gone = []
        with self.cond:
            if step < self.step:
                raise StoreError(f"{self.url}: step {step} was asked for after step {self.step}; the rank's shards are "
                                 "downloaded for its steps in order")
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
        """Stops the downloads (a reader waiting is told, a download waiting to try again gives up), and removes the
        folder once the thread is out: it waits 30 s at most for an attempt under way."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self._stop.set()
        self.thread.join(timeout=30)  # at most the attempt under way
        if not self.thread.is_alive():  # else a download hangs: the folder goes with a later run (its flock ends here)
            shutil.rmtree(self.folder, ignore_errors=True)
        self._alive.close()


def _remove_stale(root: str) -> None:
    """The folders of this host's processes that are gone (a killed run leaves its shards behind): those whose
    `.alive` flock nobody holds (the kernel drops it with its process, whatever pid namespace it had). Another
    host's folders are its own to clean: on a shared filesystem an flock may be seen on its node alone."""
    host = socket.gethostname()
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if name.rsplit("-", 2)[0] != host:  # <host>-<pid>-<uuid>: this host's exactly (not host "a-b" for "a")
            continue
        folder = os.path.join(root, name)
        try:
            fd = os.open(os.path.join(folder, ".alive"), os.O_RDONLY)  # never created here
        except OSError:  # no .alive (being created, or a filesystem without flock): left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # got it: its process is gone (shared: NFS on a read-only fd)
        except OSError:
            continue  # held: a live rank's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
