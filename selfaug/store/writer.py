"""Writing a store (docs/design.md, "Writing"): `StoreWriter`, the one way a store is written, and the
printed summary. Stage 1 computes rows and hands them here; the writer takes the store's settings
(never the recipe) and asks the store's signal for everything that differs between signals.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

import numpy as np
import yaml

from .. import dist
from ..config import config_digest
from ..data import COUNTED
from .checks import check_shard, verify_shard, verify_shared
from ..durable import write_atomic
from .files import StoreLock, TornManifest, read_manifest, read_shard, write_json_atomic, write_shard
from .format import FORMAT, MANIFEST, VERSION, ShardRows, StoreError, shard_name, sidecar_name
from .remote import pull, push
from .settings import settings_diff
from .signals import signal_of


class StoreWriter:
    """open() checks the directory and says which chunks each rank still has to compute (a chunk whose
    shard verifies against its sidecar is kept; the others are dealt round-robin over the ranks); write()
    stores a chunk's rows as a shard and its sidecar; close() (all ranks) writes the manifest on rank 0 and
    returns the summary. A rerun over a complete, verified store changes nothing on disk. Every decision the
    ranks share (the store is complete, the directory may be used, which chunks remain) is taken once and
    broadcast.

    settings: `format.store_settings`; computed_with: how (teacher, world size), for the manifest;
    config: the resolved recipe (a dict), saved as config.yaml and in the manifest."""

    def __init__(self, out_dir: str, settings: dict, computed_with: dict, *, overwrite: bool = False,
                 config: dict | None = None, publish: str | None = None):
        self.dir, self.settings, self.computed_with = out_dir, settings, computed_with
        self.publish = publish  # a store on object storage: out_dir is this node's mirror of it
        if publish:  # every node's mirror, not only rank 0's (which _prepare makes): a rank writes its shards there
            os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
        self.overwrite, self.config = overwrite, config or {}
        self.rank, self.world = dist.rank_world()
        self.signal = signal_of(settings)
        self.digest = config_digest(settings)
        self.computed = np.zeros(3, dtype=np.int64)  # shards, examples, tokens computed by this rank
        self.complete = False
        self.lock = StoreLock(out_dir) if self.rank == 0 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock:  # also when stage 1 fails: the next run must not find this process's lock
            self.lock.release()
        return False

    def open(self, n_chunks: int) -> list[list[int]]:
        """The chunks each rank has to compute, the same lists on every rank: the chunks not yet stored, dealt
        round-robin over the ranks (`share_chunks`)."""
        self.n_chunks = n_chunks
        self.complete = self._already_complete()  # then nothing is written, not even a lock
        if self.complete:
            return [[] for _ in range(self.world)]
        dist.decide(self._prepare)
        # the shards already there are verified (read whole) by the ranks in turn, chunk j on rank j mod world
        missing = [j for j in range(n_chunks) if j % self.world == self.rank and not self._sidecar_ok(j)]
        return share_chunks([j for share in dist.all_gather_object(missing) for j in share], self.world)

    def _already_complete(self) -> bool:
        def existing():  # rank 0 looks, every rank gets its answer: they cannot see the directory differently
            return read_manifest(self.dir) if os.path.exists(os.path.join(self.dir, MANIFEST)) else None
        try:
            manifest = dist.decide(existing)
        except StoreError:  # torn: rebuilt from the shards by _prepare and close
            return False
        if manifest is None:
            return False
        manifest, problems, _ = verify_shared(self.dir, values=False, manifest=manifest)
        return (not problems and not settings_diff(self.settings, manifest["settings"])
                and len(manifest["shards"]) == self.n_chunks)

    def _prepare(self) -> None:
        """Rank 0: take the lock; refuse a directory holding a store made from other settings, unless asked to
        overwrite; then the directory, config.yaml and an incomplete manifest."""
        self.lock.acquire()
        remove_stale_tmp(self.dir)
        path = os.path.join(self.dir, MANIFEST)
        shards = os.path.join(self.dir, "shards")
        empty = {"shards"} if os.path.isdir(shards) and not os.listdir(shards) else set()  # a new store's mirror
        if os.path.exists(path) or (os.path.isdir(shards) and not empty):
            try:
                diff = settings_diff(self.settings, read_manifest(self.dir)["settings"])
            except TornManifest as e:  # the shards say what they were made from: those that verify are kept
                diff = self._sidecars_diff()
                if not diff:
                    print(f"{self.dir}: {MANIFEST} is missing or torn ({e}); it is rebuilt from the shards that "
                          "verify", flush=True)
            if diff and not self.overwrite:
                raise StoreError(f"{self.dir} holds a teacher store made from other settings: " + "; ".join(diff)
                                 + ". Choose another teacher.output_dir or pass teacher.overwrite=true.")
            if diff:  # other settings: no shard can be kept
                shutil.rmtree(shards, ignore_errors=True)
                if os.path.exists(path):
                    os.remove(path)
        elif os.path.isdir(self.dir) and set(os.listdir(self.dir)) - {".lock"} - empty and not self.overwrite:
            raise StoreError(f"{self.dir} exists and is not a teacher store; choose an empty teacher.output_dir "
                             "or pass teacher.overwrite=true")
        os.makedirs(shards, exist_ok=True)
        write_atomic(os.path.join(self.dir, "config.yaml"), yaml.safe_dump(self.config, sort_keys=False))
        write_json_atomic(path, {"format": FORMAT, "version": VERSION, "status": "incomplete",
                                 "settings": self.settings})

    def _sidecars_diff(self) -> list[str]:
        """Without a readable manifest: what differs between the recipe's settings and those the shards were
        computed from, by their sidecars (a sidecar that cannot be read claims nothing)."""
        for side in sorted(glob.glob(os.path.join(self.dir, "shards", "shard-*.json"))):
            entry = _load_json(side)
            if entry is None or entry.get("settings_digest") == self.digest:
                continue
            found = entry.get("settings")
            return (settings_diff(self.settings, found) if isinstance(found, dict) else []) or [
                f"{os.path.basename(side)} was computed from other settings (digest {entry.get('settings_digest')}, "
                f"recipe {self.digest})"]
        return []

    def _sidecar_ok(self, j: int) -> bool:
        entry = _load_json(os.path.join(self.dir, "shards", sidecar_name(j)))
        if entry is None:
            return False
        return entry.get("settings_digest") == self.digest and verify_shard(self.dir, entry) is None

    def write(self, j: int, rows: ShardRows, first_record: int, records: int, long_stats: dict) -> dict:
        bad = self.signal.bad_positions(rows.signal)
        if len(bad):
            example, t = rows.where(int(bad[0]))
            raise StoreError(f"the teacher produced non-finite log-probs for example {example} at position "
                             f"{t} ({len(bad)} positions in chunk {j}); nothing was written for this chunk. Check the "
                             "model's weights and model.dtype (float16 overflows in some models; use bfloat16 or "
                             "float32)")
        entry = write_shard(os.path.join(self.dir, "shards", shard_name(j)), rows.table(self.signal),
                            self.settings["compression"])
        tokens = int(sum(len(x) for x in rows.input_ids))
        # the settings, the chunk count and how it was computed: what rebuilding the manifest from the shards needs
        entry.update(chunk=j, chunks=self.n_chunks, settings=self.settings, computed_with=self.computed_with,
                     first_example_id=first_record, records=records, settings_digest=self.digest,
                     positions=rows.position_count(), entries=self.signal.entries(rows.signal), tokens=tokens,
                     long=long_stats, **self.signal.sidecar(rows.signal),
                     # per example, what stage 2 plans with before it reads the shard (store.ShardCache)
                     lengths={"tokens": [len(x) for x in rows.input_ids], "prompt": [int(p) for p in rows.prompt_len],
                              "kl": [len(p) for p in rows.positions]})
        write_json_atomic(os.path.join(self.dir, "shards", sidecar_name(j)), entry)
        if self.publish:  # uploaded, the sidecar after its shard: a sidecar in the bucket names a shard that is there
            push(self.publish, self.dir, entry["file"])
            push(self.publish, self.dir, os.path.join("shards", sidecar_name(j)))
        self.computed += (1, entry["rows"], tokens)
        return entry

    def close(self, elapsed: float) -> dict | None:
        """All ranks: the counts of what this run computed are summed over ranks (and the shards of each rank
        kept); rank 0 writes the manifest (unless the store was already complete) and returns the summary."""
        by_rank = dist.all_gather_object(self.computed.tolist())  # [[shards, examples, tokens]] in rank order
        computed = np.sum(by_rank, axis=0)
        elapsed = dist.all_reduce_max(elapsed)
        summary = None
        if self.rank == 0:
            if self.complete:
                manifest = read_manifest(self.dir)
            else:
                if self.publish:  # every rank's sidecars, from the bucket (ranks on other nodes uploaded theirs)
                    pull(self.publish, shards=False)
                manifest = build_manifest(self.dir, self.settings, self.n_chunks, self.computed_with, self.config)
                write_json_atomic(os.path.join(self.dir, MANIFEST), manifest)
                if self.publish:  # the manifest last: it names only shards that are in the bucket
                    push(self.publish, self.dir, "config.yaml")
                    push(self.publish, self.dir, MANIFEST)
            summary = {**manifest["totals"],
                       "long_examples": {k: manifest["long_examples"][k] for k in ("policy", "skipped", "truncated")},
                       "elapsed_s": elapsed, "shards": self.n_chunks, "shards_computed": int(computed[0]),
                       "shards_computed_by_rank": [int(r[0]) for r in by_rank],
                       "shards_reused": self.n_chunks - int(computed[0]), "examples_computed": int(computed[1]),
                       "tokens_computed": int(computed[2]), "examples_per_s": computed[1] / max(elapsed, 1e-9),
                       "tokens_per_s": computed[2] / max(elapsed, 1e-9)}
            print(format_summary(self.dir, manifest, summary), flush=True)
            if self.lock:
                self.lock.release()
        dist.barrier()
        return summary



def build_manifest(store_dir: str, settings: dict, n_chunks: int, computed_with: dict, config: dict) -> dict:
    """The complete manifest, from the sidecars of chunks 0 .. n_chunks-1."""
    shards = []
    for j in range(n_chunks):
        with open(os.path.join(store_dir, "shards", sidecar_name(j))) as f:
            shards.append(json.load(f))
    positions, nbytes = sum(s["positions"] for s in shards), sum(s["bytes"] for s in shards)
    entries = sum(s["entries"] for s in shards)
    totals = {
        "examples": sum(s["rows"] for s in shards), "records": sum(s["records"] for s in shards),
        "positions": positions, "tokens": sum(s["tokens"] for s in shards), "bytes": nbytes,
        "bytes_per_position": nbytes / max(positions, 1),
        "entries": entries, "entries_per_position": entries / max(positions, 1),
        "bytes_per_entry": nbytes / max(entries, 1), "mean_tail_mass": None,
        **signal_of(settings).totals(shards, positions),
    }
    long_examples = {"policy": settings["long_policy"], "max_seq_len": settings["max_seq_len"]}
    for key in COUNTED:  # a store made before has no "unanswered"
        long_examples[key] = sum(s["long"].get(key, 0) for s in shards)
        long_examples[f"{key}_ids"] = [i for s in shards for i in s["long"].get(f"{key}_ids", [])][:1000]
    keep = ("file", "rows", "first_example_id", "records", "positions", "tokens", "bytes", "sha256")
    return {"format": FORMAT, "version": VERSION, "status": "complete", "settings": settings,
            "computed_with": computed_with, "totals": totals, "long_examples": long_examples,
            "shards": [{k: s[k] for k in keep} for s in shards], "config": config,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def rebuild_manifest(store_dir: str) -> tuple[dict, list[str]]:
    """`selfaug inspect --repair`: the manifest rebuilt from the shards alone, without a model: each shard's
    sidecar names its settings and the chunk count, and a shard is kept if it matches its sidecar's size and
    sha256 and its schema and values the settings. Complete when every chunk verifies; otherwise an
    incomplete manifest that the same precompute finishes (computing only the missing chunks). Nothing is
    deleted. (manifest, problems: the shards that do not verify)."""
    lock = StoreLock(store_dir)
    lock.acquire()
    try:
        remove_stale_tmp(store_dir)
        found = {}
        for side in sorted(glob.glob(os.path.join(store_dir, "shards", "shard-*.json"))):
            entry = _load_json(side)
            if entry is not None and isinstance(entry.get("settings"), dict) and "chunks" in entry:
                found.setdefault(entry["settings_digest"], []).append(entry)
        if not found:
            raise StoreError(f"{store_dir}: no shard sidecar names the settings it was computed from (none there, or "
                             "written by an earlier selfaug): run the same `selfaug precompute` again; it keeps the "
                             "shards that verify")
        if len(found) > 1:
            raise StoreError(f"{store_dir} holds shards of {len(found)} different settings; run the same "
                             "`selfaug precompute` again (it keeps the shards of its own settings that verify)")
        entries = next(iter(found.values()))
        settings, n_chunks = entries[0]["settings"], entries[0]["chunks"]
        problems, kept = [], set()
        for entry in entries:
            name = entry["file"]
            bad = verify_shard(store_dir, entry) or check_shard(read_shard(os.path.join(store_dir, name)), settings,
                                                                name)
            problems += [bad] if isinstance(bad, str) else bad
            if not bad:
                kept.add(entry["chunk"])
        config = _load_yaml(os.path.join(store_dir, "config.yaml"))
        if kept >= set(range(n_chunks)):
            manifest = build_manifest(store_dir, settings, n_chunks, entries[0].get("computed_with", {}), config)
        else:
            manifest = {"format": FORMAT, "version": VERSION, "status": "incomplete", "settings": settings}
            problems.append(f"{n_chunks - len(kept & set(range(n_chunks)))} of {n_chunks} shards are missing or do "
                            "not verify: run the same `selfaug precompute` again to compute them (the others are kept)")
        write_json_atomic(os.path.join(store_dir, MANIFEST), manifest)
        return manifest, problems
    finally:
        lock.release()


def remove_stale_tmp(store_dir: str) -> None:
    """The temporary files a stopped writer left (`*.<host>-<pid>.tmp`): removed by the one holding the store's
    lock, so their writer is gone."""
    for tmp in glob.glob(os.path.join(store_dir, "*.tmp")) + glob.glob(os.path.join(store_dir, "shards", "*.tmp")):
        os.remove(tmp)


def _load_json(path: str) -> dict | None:
    """A sidecar's content, or None where it is missing or unreadable (it then claims nothing)."""
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def _load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def share_chunks(chunks: list[int], world: int) -> list[list[int]]:
    """The chunks still to compute, dealt round-robin over `world` ranks in chunk order: every rank gets as many
    as any other, give or take one, whichever chunks were done before (chunk j on rank j mod world would leave a
    store resumed after one rank's chunks were done with all the work on the others). Where a chunk is computed
    changes nothing: a shard depends only on its chunk index."""
    ordered = sorted(chunks)
    return [ordered[r::world] for r in range(world)]


def format_summary(out_dir: str, manifest: dict, extra: dict | None = None) -> str:
    t, s, lg = manifest["totals"], manifest["settings"], manifest["long_examples"]
    signal = signal_of(s)
    how = manifest.get("computed_with", {})
    rule = "" if s.get("position_fraction", 1) == 1 and s.get("max_positions") is None else (
        f", position_fraction={s['position_fraction']}, max_positions={s.get('max_positions')}")
    lines = [f"teacher store {out_dir}",
             f"  model {s['model']['name_or_path']} ({s['model']['dtype']}, vocab {s['model']['vocab_size']}), "
             f"{signal.words()}{rule}, positions={s['positions']}, values {s['value_dtype']}, ids {s['id_dtype']}, "
             f"compression {s['compression']}",
             f"  examples {t['examples']} of {t['records']} records in {len(manifest['shards'])} shards, "
             f"{t['tokens']} tokens, {t['positions']} stored positions",
             f"  {t['bytes'] / 1e6:.2f} MB, {t['bytes_per_position']:.1f} bytes/position, "
             f"{t['bytes_per_entry']:.2f} bytes per (id, value) entry incl. tail and positions",
             f"  {signal.summary(t)}",
             f"  long examples (> {lg['max_seq_len']} tokens, policy {lg['policy']}): "
             f"{lg['skipped']} skipped, {lg['truncated']} truncated"
             + (f"; {lg['unanswered']} records without an answer skipped" if lg.get("unanswered") else "")]
    if how:
        lines.append(f"  computed with: teacher {how.get('teacher', '?')} on {how.get('world_size', '?')} rank(s)")
    if extra and "elapsed_s" in extra:
        el = max(extra["elapsed_s"], 1e-9)
        by_rank = extra.get("shards_computed_by_rank", [])
        split = f"{' + '.join(map(str, by_rank))} on {len(by_rank)} ranks, " if len(by_rank) > 1 else ""
        lines.append(f"  this run: {el:.1f} s, {extra['shards_computed']} shards computed "
                     f"({split}{extra['examples_computed']} examples), {extra['shards_reused']} reused, "
                     f"{extra['examples_per_s']:.2f} examples/s, {extra['tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
