"""Checking a store (docs/design.md, "Checks"): each shard's size and sha256 against the manifest, its
schema against the settings, the position rule's counts, and the signal's own value checks.

`verify_store` checks every shard in one process (`selfaug inspect`). `verify_shared` is what the
stages use when they open a store on many ranks: the manifest is read once (rank 0) and broadcast,
shard s is hashed and value-checked by rank s mod world only, and the problems are gathered, so that
every rank holds the same list (and raises the same line) after doing 1/world of the work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .. import dist
from ..hashing import sha256_file
from .files import read_manifest, read_shard
from .format import PositionRule, flatten, schema
from .signals import signal_of


def verify_shard(store_dir: str, entry: dict, mode: str = "sha256") -> str | None:
    """None if the shard file matches its manifest entry (size, and sha256 unless mode=size), else what is wrong."""
    path = os.path.join(store_dir, entry["file"])
    if not os.path.exists(path):
        return f"{entry['file']} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{entry['file']} has {size} bytes, the manifest says {entry['bytes']}"
    if mode == "sha256" and sha256_file(path) != entry["sha256"]:
        return f"{entry['file']} does not match its sha256 in the manifest (corrupted)"
    return None


def check_shard(table: pa.Table, settings: dict, name: str, flat: dict | None = None) -> list[str]:
    """What is wrong with a shard's schema or values, checked against the manifest's settings (vectorized;
    costs about as much as its sha256): the schema (signal, k, id and value dtypes); the number of stored
    positions per example for the position rule, and that they are candidates; then the signal's own
    value checks. `flat`: the shard already flattened."""
    signal = signal_of(settings)
    want = schema(signal)
    if not table.schema.equals(want):
        got = [f"{f.name}: {f.type}" for f in table.schema][4:]
        return [f"{name}: its schema does not match the manifest (manifest: {signal.words()}, ids "
                f"{settings['id_dtype']}, values {settings['value_dtype']}; shard: {', '.join(got)}); "
                "recompute the store"]
    if table.num_rows == 0:
        return []
    sh = flat if flat is not None else flatten(table, signal)
    tokens, prompt, count = np.diff(sh["tok_off"]), sh["prompt_len"].astype(np.int64), np.diff(sh["pos_off"])
    rule = PositionRule.of_settings(settings)
    lo, hi = rule.candidates(tokens, prompt)
    expected = rule.count(hi - lo)
    bad = np.nonzero(count != expected)[0]
    if len(bad):
        i = bad[0]
        return [f"{name}: example {sh['example_id'][i]} stores {count[i]} positions, the position rule "
                f"(positions={settings['positions']}, position_fraction={rule.fraction}, max_positions="
                f"{rule.max_positions}) means {expected[i]}"]
    where = lambda rows, what: _where(sh, rows, name, what)
    pos, per = sh["positions"], np.repeat(np.arange(len(count)), count)
    outside = np.nonzero((pos < lo[per]) | (pos >= hi[per]))[0]
    if len(outside):
        return [where(outside, f"a position outside positions={settings['positions']}")]
    return signal.check(sh, where)


def _where(sh: dict, rows: np.ndarray, name: str, what: str) -> str:
    """'shard: example E, position t: what (and N more rows)' for the first of `rows`."""
    r = int(rows[0])
    example = int(np.searchsorted(sh["pos_off"], r, side="right") - 1)
    more = f" (and {len(rows) - 1} more positions)" if len(rows) > 1 else ""
    return (f"{name}: example {sh['example_id'][example]}, position {sh['positions'][r]}: {what}{more}; the shard "
            f"is corrupt: remove {name} and run the same `selfaug precompute` again (it computes that shard alone)")


INCOMPLETE = "the store is incomplete: run `selfaug precompute` again to finish it"


def verify_store(store_dir: str, mode: str = "sha256", values: bool = False) -> tuple[dict, list[str]]:
    """(manifest, problems), in this process alone: every shard's size and sha256 (mode=size: size only)
    against the manifest; with `values`, also its schema and values (`check_shard`)."""
    manifest = read_manifest(store_dir)
    if manifest.get("status") != "complete":
        return manifest, [INCOMPLETE]
    problems = [p for p in (verify_shard(store_dir, e, mode) for e in manifest["shards"]) if p]
    if values and not problems:
        for entry in manifest["shards"]:
            problems += check_shard(read_shard(os.path.join(store_dir, entry["file"])), manifest["settings"],
                                    entry["file"])
    return manifest, problems


@dataclass
class Work:
    """What this rank checked of a store when it was opened."""
    shards: list[int] = field(default_factory=list)  # indices hashed and value-checked here
    bytes_hashed: int = 0
    positions_checked: int = 0


def verify_shared(store_dir: str, mode: str = "sha256", values: bool = True, shard_check=None,
                  manifest: dict | None = None) -> tuple[dict, list[str], Work]:
    """(manifest, problems, this rank's work) on every rank, each rank checking shards s = rank mod world.
    The manifest is rank 0's, broadcast; the problems are gathered (in shard order), so every rank
    decides alike (`manifest`: one already shared). `shard_check(manifest, s, entry) -> list[str]` replaces the value check of shard s (the reader
    passes one that keeps the flattened shard)."""
    rank, world = dist.rank_world()
    if manifest is None:
        manifest = dist.decide(lambda: read_manifest(store_dir))
    work = Work()
    if manifest.get("status") != "complete":
        return manifest, [INCOMPLETE], work
    mine = []
    for s, entry in enumerate(manifest["shards"]):
        if s % world != rank:
            continue
        work.shards.append(s)
        problem = verify_shard(store_dir, entry, mode)
        if problem is None and mode == "sha256":
            work.bytes_hashed += entry["bytes"]
        if problem is None and values:
            found = (shard_check(manifest, s, entry) if shard_check else
                     check_shard(read_shard(os.path.join(store_dir, entry["file"])), manifest["settings"],
                                 entry["file"]))
            work.positions_checked += entry.get("positions", 0)
            mine += [(s, p) for p in found]
        elif problem is not None:
            mine.append((s, problem))
    gathered = sorted(p for part in dist.all_gather_object(mine) for p in part)
    return manifest, [p for _, p in gathered], work
