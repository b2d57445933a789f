"""The teacher store: the one owner of its format (docs/design.md, "The teacher store").

Sharded Arrow IPC stream files plus a manifest. One row per example: example_id, input_ids,
prompt_len, positions, then the signal: topk_ids, topk_logprobs, tail_logprob (teacher.signal=topk)
or sample_ids, sample_counts, sample_logprobs (sampled). This module owns everything about the
format, for both stages: which positions are stored (`PositionRule`) and the seeded uniforms behind
the samples (`sample_uniforms`), what a store depends on
(`store_settings`) and the one comparison of settings (`settings_diff`), the writer that stage 1
hands rows to (`StoreWriter`: directory check, shard + sidecar, skip-if-verified, the manifest),
verification, the summary, and memory-mapped reading for stage 2 (`TeacherStore`). Stage 1 computes
rows; stage 2 reads them; neither imports the other.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from . import dist
from .config import Config, config_digest
from .hashing import sha256_file

FORMAT = "selfaug-teacher-store"
VERSION = 2  # 2: the signal (topk | sampled) and the position rule in the settings
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    pass


# ---- what is stored -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PositionRule:
    """Which positions t of an example are stored and trained on: t's distribution (over the token
    after input_ids[:t+1]) enters the KL. The candidates by mode: prompt [0, P) (the reference masks
    unshifted labels == -100), response [P, L), all [0, L). Of n candidates, count(n) =
    max(1, floor(fraction * n + 1/2)) (capped by max_positions) are kept: a subset drawn from
    (seed, example id) alone, so the same on every rerun, at any world size, offline and online."""
    mode: str = "prompt"
    fraction: float = 1.0
    max_positions: int | None = None
    seed: int = 0

    @classmethod
    def of(cls, tc) -> "PositionRule":
        """The rule of a TeacherConfig."""
        return cls(tc.positions, tc.position_fraction, tc.max_positions, tc.seed)

    @property
    def sampled(self) -> bool:
        return self.fraction < 1 or self.max_positions is not None

    def candidates(self, length, prompt_len):
        """(lo, hi) of the candidate positions; numpy arrays work too."""
        return {"prompt": (0 * length, prompt_len), "response": (prompt_len, length), "all": (0 * length, length)}[
            self.mode]

    def count(self, n):
        """How many of n candidates are kept (numpy arrays work too)."""
        n = np.asarray(n, dtype=np.int64)
        keep = np.where(n > 0, np.maximum(1, np.floor(self.fraction * n + 0.5)), 0).astype(np.int64)
        return keep if self.max_positions is None else np.minimum(keep, self.max_positions)

    def positions(self, example_id: int, length: int, prompt_len: int) -> np.ndarray:
        """The kept positions of one example, ascending (int32)."""
        lo, hi = self.candidates(length, prompt_len)
        n = hi - lo
        keep = int(self.count(n))
        if keep == n:
            return np.arange(lo, hi, dtype=np.int32)
        rng = np.random.default_rng([self.seed, _POSITIONS_STREAM, int(example_id)])
        return (np.sort(rng.choice(n, keep, replace=False)) + lo).astype(np.int32)


_POSITIONS_STREAM, _SAMPLES_STREAM = 1, 2  # independent seeded streams per example


def sample_uniforms(seed: int, example_id: int, positions: int, samples: int) -> np.ndarray:
    """The uniforms in [0, 1) behind an example's sampled signal (positions, samples), seeded by
    (seed, example id) alone: the same draws on every rerun and at any world size."""
    return np.random.default_rng([seed, _SAMPLES_STREAM, int(example_id)]).random((positions, samples))


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest id type that holds the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def store_settings(cfg: Config, tok, vocab_size: int, dtype, data_fp: dict) -> dict:
    """Everything a store depends on; a store is reused or resumed only if this matches exactly."""
    from .data import tokenizer_fingerprint
    from .models import model_fingerprint
    tc = cfg.teacher
    return {
        "model": {**model_fingerprint(cfg.model), "dtype": str(dtype).replace("torch.", ""), "vocab_size": vocab_size},
        "tokenizer": tokenizer_fingerprint(tok),
        "data": data_fp,
        "signal": tc.signal,
        "k": tc.k if tc.signal == "topk" else None,
        "samples": tc.samples if tc.signal == "sampled" else None,
        "positions": tc.positions,
        "position_fraction": tc.position_fraction,
        "max_positions": tc.max_positions,
        "seed": tc.seed if tc.signal == "sampled" or PositionRule.of(tc).sampled else None,
        "value_dtype": tc.value_dtype,
        "id_dtype": id_dtype_for(vocab_size),
        "compression": tc.compression,
        "shard_size": tc.shard_size,
        "max_seq_len": cfg.data.max_seq_len,
        "long_policy": cfg.data.long_policy,
        "system_prompt": cfg.data.system_prompt,
    }


# the settings that must match the recipe for the stored teacher to be the right one for training
# (a store's compression or shard size, say, does not change what it holds)
MATCHED = ("model.name_or_path", "model.content_hash", "model.vocab_size", "tokenizer.vocab_sha256",
           "tokenizer.chat_template_sha256", "data.source", "data.sha256", "data.records", "signal", "k", "samples",
           "positions", "position_fraction", "max_positions", "seed", "max_seq_len", "long_policy", "system_prompt")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_diff(expected: dict, found: dict, keys=None) -> list[str]:
    """The one comparison of store settings: 'key (store: x, recipe: y)' for each differing dotted key
    (all of them, or those in `keys`)."""
    a, b = _leaves(expected), _leaves(found)
    names = keys if keys is not None else sorted(set(a) | set(b))
    return [f"{k} (store: {b.get(k)!r}, recipe: {a.get(k)!r})" for k in names if a.get(k) != b.get(k)]


def check_store(store_dir: str, manifest: dict, expected: dict) -> None:
    """Refuse a store made for another model, tokenizer, data, signal or k, naming each differing field."""
    found = manifest["settings"].get("signal")
    if found != expected["signal"]:
        raise StoreError(f"teacher store {store_dir} holds teacher.signal={found} values, the recipe has "
                         f"teacher.signal={expected['signal']}: set teacher.signal={found}, or precompute a "
                         f"{expected['signal']} store into another teacher.output_dir")
    diff = settings_diff(expected, manifest["settings"], MATCHED)
    if diff:
        raise StoreError(f"teacher store {store_dir} does not match this recipe: " + "; ".join(diff)
                         + ". Re-run `selfaug precompute` with this recipe, or point teacher.output_dir "
                           "at the store made for it.")


def schema(settings: dict) -> pa.Schema:
    """The shard schema of a store's settings (its signal, k, id and value dtypes)."""
    ids = {"uint16": pa.uint16(), "uint32": pa.uint32()}[settings["id_dtype"]]
    vals = {"float16": pa.float16(), "float32": pa.float32()}[settings["value_dtype"]]
    common = [("example_id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("prompt_len", pa.int32()),
              ("positions", pa.list_(pa.int32()))]
    if settings.get("signal", "topk") == "topk":
        k = settings["k"]
        return pa.schema(common + [
            ("topk_ids", pa.list_(pa.list_(ids, k))),  # fixed-size inner lists: no per-position offsets
            ("topk_logprobs", pa.list_(pa.list_(vals, k))),  # descending
            ("tail_logprob", pa.list_(pa.float32())),  # log(1 - sum of p over the top-k), from fp32
        ])
    return pa.schema(common + [  # per position: the unique sampled ids, their counts (sum N), exact log-probs
        ("sample_ids", pa.list_(pa.list_(ids))),
        ("sample_counts", pa.list_(pa.list_(pa.uint16()))),
        ("sample_logprobs", pa.list_(pa.list_(vals))),
    ])


TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")
SAMPLED_COLUMNS = ("sample_ids", "sample_counts", "sample_logprobs")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


@dataclass
class ShardRows:
    """The rows of one shard, as flat numpy arrays (positions of all examples concatenated).
    `signal`, N = stored positions of the shard:
      topk: topk_ids (N, K) uint16|uint32, topk_logprobs (N, K), tail_logprob (N,) float32;
      sampled: sample_len (N,) unique ids per position, and sample_ids, sample_counts (uint16),
      sample_logprobs flat over all of them."""
    example_id: np.ndarray  # (R,) int64
    input_ids: list  # R arrays of int32
    prompt_len: np.ndarray  # (R,) int32
    positions: list  # R arrays of int32
    signal: dict

    def table(self, sch: pa.Schema) -> pa.Table:
        counts = np.array([len(p) for p in self.positions], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        value_type = lambda name: sch.field(name).type.value_type.value_type
        cols = [
            pa.array(self.example_id, type=pa.int64()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.input_ids], type=pa.list_(pa.int32())),
            pa.array(self.prompt_len, type=pa.int32()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.positions], type=pa.list_(pa.int32())),
        ]
        sig = self.signal
        if "topk_ids" in sch.names:
            k = sch.field("topk_ids").type.value_type.list_size
            for name in ("topk_ids", "topk_logprobs"):
                fixed = pa.FixedSizeListArray.from_arrays(pa.array(sig[name].reshape(-1), type=value_type(name)), k)
                cols.append(pa.ListArray.from_arrays(offsets, fixed))
            cols.append(pa.ListArray.from_arrays(offsets, pa.array(sig["tail_logprob"], type=pa.float32())))
        else:
            inner = pa.array(np.concatenate([[0], np.cumsum(sig["sample_len"])]).astype(np.int32))
            for name in SAMPLED_COLUMNS:
                per_position = pa.ListArray.from_arrays(inner, pa.array(sig[name], type=value_type(name)))
                cols.append(pa.ListArray.from_arrays(offsets, per_position))
        return pa.Table.from_arrays(cols, schema=sch)

    def bad_positions(self) -> np.ndarray:
        """Indices of the stored positions with a non-finite log-prob (or tail log-mass)."""
        return _bad_positions(self.signal)

    def entries(self) -> int:
        """(id, value) entries stored: positions x k, or the unique samples."""
        sig = self.signal
        return int(sig["topk_ids"].size) if "topk_ids" in sig else int(len(sig["sample_ids"]))


def _bad_positions(sig: dict) -> np.ndarray:
    if "topk_logprobs" in sig:
        tail = sig["tail_logprob"]
        return np.nonzero(~np.isfinite(sig["topk_logprobs"].astype(np.float32)).all(axis=1) | np.isnan(tail)
                          | (tail == np.inf))[0]
    bad = np.nonzero(~np.isfinite(sig["sample_logprobs"].astype(np.float32)))[0]
    return np.unique(_entry_position(sig["sample_len"], bad))


def _entry_position(sample_len: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """The position index of each flat sample entry."""
    return np.searchsorted(np.cumsum(sample_len), entries, side="right")


# ---- files --------------------------------------------------------------------------------------

def _tmp(path: str) -> str:
    """A temporary name unique to this writer (host, pid): two writers never share one."""
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"


def write_shard(path: str, table: pa.Table, compression: str = "none") -> dict:
    """Write under a temporary name, fsync, rename: a shard file is either whole or absent."""
    tmp = _tmp(path)
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    try:
        with pa.OSFile(tmp, "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
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
    tmp = _tmp(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_manifest(store_dir: str) -> dict:
    path = os.path.join(store_dir, MANIFEST)
    if not os.path.exists(path):
        raise StoreError(f"{store_dir} is not a teacher store (no {MANIFEST}); run `selfaug precompute` first")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); rebuild the store with teacher.overwrite=true") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT} manifest; rebuild the store with teacher.overwrite=true")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{path}: store format version {manifest.get('version')} is not {VERSION}; recompute it")
    return manifest


def verify_shard(store_dir: str, entry: dict, mode: str = "sha256") -> str | None:
    """None if the shard file matches its manifest entry, else what is wrong."""
    path = os.path.join(store_dir, entry["file"])
    if not os.path.exists(path):
        return f"{entry['file']} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{entry['file']} has {size} bytes, the manifest says {entry['bytes']}"
    if mode == "sha256" and sha256_file(path) != entry["sha256"]:
        return f"{entry['file']} does not match its sha256 in the manifest (corrupted)"
    return None


def verify_store(store_dir: str, mode: str = "sha256", values: bool = False) -> tuple[dict, list[str]]:
    """(manifest, problems): every shard's size and sha256 (mode=size: size only) against the manifest;
    with `values`, also its schema and values (`check_shard`)."""
    manifest = read_manifest(store_dir)
    if manifest.get("status") != "complete":
        return manifest, ["the store is incomplete: run `selfaug precompute` again to finish it"]
    problems = [p for p in (verify_shard(store_dir, e, mode) for e in manifest["shards"]) if p]
    if values and not problems:
        for entry in manifest["shards"]:
            problems += check_shard(read_shard(os.path.join(store_dir, entry["file"])), manifest["settings"],
                                    entry["file"])
    return manifest, problems


def read_shard(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


VALUE_TOL = {"float16": 2e-3, "float32": 1e-4}  # |sum p - 1| allowed by the stored values' rounding


def check_shard(table: pa.Table, settings: dict, name: str) -> list[str]:
    """What is wrong with a shard's schema or values, checked against the manifest's settings (vectorized;
    costs about as much as its sha256): the signal, k, id and value dtypes; the number of stored
    positions per example for the position rule, and that they are candidates; then per signal:
    top-k: finite log-probs <= 0, a tail log-mass that is not NaN or > 0, and top-k + tail mass = 1
    within the value dtype's rounding; sampled: at least one sample per position, counts that sum to
    N, finite log-probs <= 0 whose mass is at most 1."""
    want = schema(settings)
    if not table.schema.equals(want):
        got = [f"{f.name}: {f.type}" for f in table.schema][4:]
        return [f"{name}: its schema does not match the manifest (manifest: signal={settings.get('signal', 'topk')}, "
                f"k={settings.get('k')}, ids {settings['id_dtype']}, values {settings['value_dtype']}; shard: "
                f"{', '.join(got)}); recompute the store"]
    if table.num_rows == 0:
        return []
    sh = _flatten(table)
    tokens, prompt, count = np.diff(sh["tok_off"]), sh["prompt_len"].astype(np.int64), np.diff(sh["pos_off"])
    rule = PositionRule(settings["positions"], settings.get("position_fraction", 1.0), settings.get("max_positions"))
    lo, hi = rule.candidates(tokens, prompt)
    expected = rule.count(hi - lo)
    bad = np.nonzero(count != expected)[0]
    if len(bad):
        i = bad[0]
        return [f"{name}: example {sh['example_id'][i]} stores {count[i]} positions, the position rule "
                f"(positions={settings['positions']}, position_fraction={rule.fraction}, max_positions="
                f"{rule.max_positions}) means {expected[i]}"]
    pos, per = sh["positions"], np.repeat(np.arange(len(count)), count)
    outside = np.nonzero((pos < lo[per]) | (pos >= hi[per]))[0]
    if len(outside):
        return [_where(sh, outside, name, f"a position outside positions={settings['positions']}")]
    tol = VALUE_TOL[settings["value_dtype"]]
    if "topk_ids" in sh:
        return _check_topk(sh, name, tol)
    return _check_sampled(sh, name, tol, settings["samples"])


def _check_topk(sh: dict, name: str, tol: float) -> list[str]:
    vals, tail = sh["topk_logprobs"].astype(np.float32), sh["tail_logprob"]
    problems = []
    for what, mask in (("a non-finite top-k log-prob", ~np.isfinite(vals).all(axis=1)),
                       ("a top-k log-prob > 0", (vals > tol).any(axis=1)),
                       ("a NaN or +inf tail log-mass", np.isnan(tail) | (tail == np.inf)),
                       ("a tail log-mass > 0", tail > tol)):
        if mask.any():
            problems.append(_where(sh, np.nonzero(mask)[0], name, what))
    if not problems:
        mass = np.exp(vals).sum(axis=1) + np.exp(tail)  # float32: its error (~1e-6) is far below tol
        off = np.abs(mass - 1) > tol
        if off.any():
            problems.append(_where(sh, np.nonzero(off)[0], name, f"top-k + tail mass off 1 by more than {tol} "
                                                              f"({mass[np.nonzero(off)[0][0]]:.6f})"))
    return problems


def _check_sampled(sh: dict, name: str, tol: float, samples: int) -> list[str]:
    n_len = sh["sample_len"]
    if (n_len < 1).any():
        return [_where(sh, np.nonzero(n_len < 1)[0], name, "a position without samples")]
    starts = sh["sample_off"][:-1]
    vals = sh["sample_logprobs"].astype(np.float32)
    sums = np.add.reduceat(sh["sample_counts"].astype(np.int64), starts)
    problems = []
    per_position = lambda entry_mask: np.unique(_entry_position(n_len, np.nonzero(entry_mask)[0]))
    for what, rows in (("sample counts that do not sum to teacher.samples=" f"{samples}", np.nonzero(sums != samples)[0]),
                       ("a non-finite sampled log-prob", per_position(~np.isfinite(vals))),
                       ("a sampled log-prob > 0", per_position(vals > tol))):
        if len(rows):
            problems.append(_where(sh, rows, name, what))
    if not problems:
        mass = np.add.reduceat(np.exp(vals), starts)
        over = np.nonzero(mass > 1 + tol)[0]
        if len(over):
            problems.append(_where(sh, over, name, f"sampled ids whose mass exceeds 1 ({mass[over[0]]:.6f})"))
    return problems


def _where(sh: dict, rows: np.ndarray, name: str, what: str) -> str:
    """'shard: example E, position t: what (and N more rows)' for the first of `rows`."""
    r = int(rows[0])
    example = int(np.searchsorted(sh["pos_off"], r, side="right") - 1)
    more = f" (and {len(rows) - 1} more positions)" if len(rows) > 1 else ""
    return (f"{name}: example {sh['example_id'][example]}, position {sh['positions'][r]}: {what}{more}; the store "
            "is corrupt: recompute it (teacher.overwrite=true)")


# ---- writing (stage 1 hands rows to this) -------------------------------------------------------

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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"another precompute is writing {os.path.dirname(self.path)} ({holder}); wait for it "
                             "to finish, or stop it, then run this one again (it resumes from the finished shards)")
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

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file is a released one
            os.close(self.fd)  # closing drops the flock
            self.fd = None

class StoreWriter:
    """The one way a store is written. open() checks the directory and says which chunks this rank
    still has to compute (a chunk whose shard verifies against its sidecar is kept); write() stores a
    chunk's rows as a shard and its sidecar; close() (all ranks) writes the manifest on rank 0 and
    returns the summary. A rerun over a complete, verified store changes nothing on disk."""

    def __init__(self, out_dir: str, cfg: Config, settings: dict, computed_with: dict, rank: int, world: int):
        self.dir, self.cfg, self.settings, self.rank, self.world = out_dir, cfg, settings, rank, world
        self.computed_with = computed_with
        self.digest = config_digest(settings)
        self.schema = schema(settings)
        self.computed = np.zeros(3, dtype=np.int64)  # shards, examples, tokens computed by this rank
        self.complete = False
        self.lock = StoreLock(out_dir) if rank == 0 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock:  # also when stage 1 fails: the next run must not find this process's lock
            self.lock.release()
        return False

    def open(self, n_chunks: int) -> list[int]:
        """The chunks j (j mod world == rank) this rank has to compute."""
        self.n_chunks = n_chunks
        self.complete = self._already_complete()  # then nothing is written, not even a lock
        if not self.complete:
            if self.lock:
                self.lock.acquire()
            self._prepare()
        dist.barrier()
        mine = [j for j in range(n_chunks) if j % self.world == self.rank]
        return [] if self.complete else [j for j in mine if not self._sidecar_ok(j)]

    def _already_complete(self) -> bool:
        try:
            manifest, problems = verify_store(self.dir)
        except StoreError:
            return False
        return (not problems and not settings_diff(self.settings, manifest["settings"])
                and len(manifest["shards"]) == self.n_chunks)

    def _prepare(self) -> None:
        """Refuse a directory holding a store made from other settings, unless asked to overwrite."""
        path = os.path.join(self.dir, MANIFEST)
        overwrite = self.cfg.teacher.overwrite
        if os.path.exists(path):
            try:
                diff = settings_diff(self.settings, read_manifest(self.dir)["settings"])
            except StoreError:
                if not overwrite:
                    raise
                diff = ["an unreadable manifest"]
            if diff and not overwrite:
                raise StoreError(f"{self.dir} holds a teacher store made from other settings: " + "; ".join(diff)
                                 + ". Choose another teacher.output_dir or pass teacher.overwrite=true.")
            if diff:
                dist.barrier()  # every rank has read the old manifest before rank 0 removes it
                if self.rank == 0:
                    shutil.rmtree(os.path.join(self.dir, "shards"), ignore_errors=True)
                    os.remove(path)
        elif os.path.isdir(self.dir) and set(os.listdir(self.dir)) - {".lock"} and not overwrite:
            raise StoreError(f"{self.dir} exists and is not a teacher store; choose an empty teacher.output_dir "
                             "or pass teacher.overwrite=true")
        dist.barrier()
        if self.rank == 0:
            os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
            self.cfg.save(os.path.join(self.dir, "config.yaml"))
            write_json_atomic(os.path.join(self.dir, MANIFEST), {"format": FORMAT, "version": VERSION,
                                                                 "status": "incomplete", "settings": self.settings})

    def _sidecar_ok(self, j: int) -> bool:
        side = os.path.join(self.dir, "shards", sidecar_name(j))
        if not os.path.exists(side):
            return False
        try:
            with open(side) as f:
                entry = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return entry.get("settings_digest") == self.digest and verify_shard(self.dir, entry) is None

    def write(self, j: int, rows: ShardRows, first_record: int, records: int, long_stats: dict) -> dict:
        bad = rows.bad_positions()
        if len(bad):
            counts = np.cumsum([len(p) for p in rows.positions])
            e = int(np.searchsorted(counts, bad[0], side="right"))
            t = int(rows.positions[e][bad[0] - (counts[e - 1] if e else 0)])
            raise StoreError(f"the teacher produced non-finite log-probs for example {rows.example_id[e]} at position "
                             f"{t} ({len(bad)} positions in chunk {j}); nothing was written for this chunk. Check the "
                             "model's weights and model.dtype (float16 overflows in some models; use bfloat16 or "
                             "float32)")
        entry = write_shard(os.path.join(self.dir, "shards", shard_name(j)), rows.table(self.schema),
                            self.settings["compression"])
        tokens = int(sum(len(x) for x in rows.input_ids))
        tail = rows.signal.get("tail_logprob")
        entry.update(chunk=j, first_example_id=first_record, records=records, settings_digest=self.digest,
                     positions=int(sum(len(p) for p in rows.positions)), entries=rows.entries(), tokens=tokens,
                     tail_mass_sum=None if tail is None else float(np.exp(tail.astype(np.float64)).sum()),
                     long=long_stats)
        write_json_atomic(os.path.join(self.dir, "shards", sidecar_name(j)), entry)
        self.computed += (1, entry["rows"], tokens)
        return entry

    def close(self, elapsed: float) -> dict | None:
        """All ranks: the counts of what this run computed are summed over ranks; rank 0 writes the
        manifest (unless the store was already complete) and returns the summary."""
        computed = dist.all_reduce_sum(self.computed)
        elapsed = dist.all_reduce_max(elapsed)
        summary = None
        if self.rank == 0:
            if self.complete:
                manifest = read_manifest(self.dir)
            else:
                manifest = self._manifest()
                write_json_atomic(os.path.join(self.dir, MANIFEST), manifest)
            summary = {**manifest["totals"],
                       "long_examples": {k: manifest["long_examples"][k] for k in ("policy", "skipped", "truncated")},
                       "elapsed_s": elapsed, "shards": self.n_chunks, "shards_computed": int(computed[0]),
                       "shards_reused": self.n_chunks - int(computed[0]), "examples_computed": int(computed[1]),
                       "tokens_computed": int(computed[2]), "examples_per_s": computed[1] / max(elapsed, 1e-9),
                       "tokens_per_s": computed[2] / max(elapsed, 1e-9)}
            print(format_summary(self.dir, manifest, summary), flush=True)
            if self.lock:
                self.lock.release()
        dist.barrier()
        return summary

    def _manifest(self) -> dict:
        shards = []
        for j in range(self.n_chunks):
            with open(os.path.join(self.dir, "shards", sidecar_name(j))) as f:
                shards.append(json.load(f))
        positions, nbytes = sum(s["positions"] for s in shards), sum(s["bytes"] for s in shards)
        entries = sum(s["entries"] for s in shards)
        totals = {
            "examples": sum(s["rows"] for s in shards), "records": sum(s["records"] for s in shards),
            "positions": positions, "tokens": sum(s["tokens"] for s in shards), "bytes": nbytes,
            "bytes_per_position": nbytes / max(positions, 1),
            "entries": entries, "entries_per_position": entries / max(positions, 1),
            "bytes_per_entry": nbytes / max(entries, 1),
            "mean_tail_mass": (sum(s["tail_mass_sum"] for s in shards) / max(positions, 1)
                               if self.settings["signal"] == "topk" else None),
        }
        skipped = [i for s in shards for i in s["long"]["skipped_ids"]]
        truncated = [i for s in shards for i in s["long"]["truncated_ids"]]
        long_examples = {"policy": self.cfg.data.long_policy, "max_seq_len": self.cfg.data.max_seq_len,
                         "skipped": sum(s["long"]["skipped"] for s in shards),
                         "truncated": sum(s["long"]["truncated"] for s in shards),
                         "skipped_ids": skipped[:1000], "truncated_ids": truncated[:1000]}
        keep = ("file", "rows", "first_example_id", "records", "positions", "tokens", "bytes", "sha256")
        return {"format": FORMAT, "version": VERSION, "status": "complete", "settings": self.settings,
                "computed_with": self.computed_with, "totals": totals, "long_examples": long_examples,
                "shards": [{k: s[k] for k in keep} for s in shards], "config": self.cfg.to_dict(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _signal_words(s: dict) -> str:
    rule = "" if s.get("position_fraction", 1) == 1 and s.get("max_positions") is None else (
        f", position_fraction={s['position_fraction']}, max_positions={s.get('max_positions')}")
    signal = f"k={s['k']}" if s.get("signal", "topk") == "topk" else f"sampled, N={s['samples']}"
    return signal + rule


def format_summary(out_dir: str, manifest: dict, extra: dict | None = None) -> str:
    t, s, lg = manifest["totals"], manifest["settings"], manifest["long_examples"]
    how = manifest.get("computed_with", {})
    lines = [f"teacher store {out_dir}",
             f"  model {s['model']['name_or_path']} ({s['model']['dtype']}, vocab {s['model']['vocab_size']}), "
             f"{_signal_words(s)}, positions={s['positions']}, values {s['value_dtype']}, ids {s['id_dtype']}, "
             f"compression {s['compression']}",
             f"  examples {t['examples']} of {t['records']} records in {len(manifest['shards'])} shards, "
             f"{t['tokens']} tokens, {t['positions']} stored positions",
             f"  {t['bytes'] / 1e6:.2f} MB, {t['bytes_per_position']:.1f} bytes/position, "
             f"{t['bytes_per_entry']:.2f} bytes per (id, value) entry incl. tail and positions",
             (f"  mean tail mass {t['mean_tail_mass']:.4f}" if t.get("mean_tail_mass") is not None else
              f"  {t['entries_per_position']:.2f} unique ids per position of {s['samples']} samples"),
             f"  long examples (> {lg['max_seq_len']} tokens, policy {lg['policy']}): "
             f"{lg['skipped']} skipped, {lg['truncated']} truncated"]
    if how:
        lines.append(f"  computed with: teacher {how.get('teacher', '?')} on {how.get('world_size', '?')} rank(s)")
    if extra and "elapsed_s" in extra:
        el = max(extra["elapsed_s"], 1e-9)
        lines.append(f"  this run: {el:.1f} s, {extra['shards_computed']} shards computed "
                     f"({extra['examples_computed']} examples), {extra['shards_reused']} reused, "
                     f"{extra['examples_per_s']:.2f} examples/s, {extra['tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)


# ---- reading (stage 2) --------------------------------------------------------------------------

class Lengths(NamedTuple):
    """Per example: sequence tokens, prompt tokens and stored KL positions (numpy arrays)."""
    tokens: np.ndarray
    prompt: np.ndarray
    kl: np.ndarray


class TeacherStore:
    """Memory-mapped read access to a verified store: example i -> tokens and teacher signal."""

    def __init__(self, store_dir: str, verify: str = "sha256"):
        manifest, problems = verify_store(store_dir, verify)
        if problems:
            raise StoreError(f"teacher store {store_dir} failed verification: " + "; ".join(problems)
                             + ". Re-run `selfaug precompute` (it rewrites the shards that fail).")
        self.dir, self.manifest = store_dir, manifest
        self.k, self.signal = manifest["settings"]["k"], manifest["settings"]["signal"]
        self._shards = []  # per shard: dict of numpy arrays
        index = []  # (shard, row) per example, in store order
        for s, entry in enumerate(manifest["shards"]):
            table = read_shard(os.path.join(store_dir, entry["file"]))
            bad = check_shard(table, manifest["settings"], entry["file"])
            if bad:
                raise StoreError(f"teacher store {store_dir}: " + "; ".join(bad))
            self._shards.append(_flatten(table) if table.num_rows else None)  # an empty shard holds no examples
            index += [(s, r) for r in range(table.num_rows)]
        if not index:
            lg = manifest.get("long_examples", {})
            raise StoreError(f"teacher store {store_dir} holds no examples: {lg.get('skipped', '?')} of "
                             f"{manifest['totals']['records']} records were skipped by data.long_policy="
                             f"{lg.get('policy')} (max_seq_len={lg.get('max_seq_len')}); raise data.max_seq_len "
                             "or use long_policy=truncate, then precompute again")
        self._index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def example(self, i: int) -> dict:
        s, r = self._index[i]
        sh = self._shards[s]
        a, b = sh["tok_off"][r], sh["tok_off"][r + 1]
        c, d = sh["pos_off"][r], sh["pos_off"][r + 1]
        out = {"example_id": int(sh["example_id"][r]), "input_ids": sh["input_ids"][a:b],
               "prompt_len": int(sh["prompt_len"][r]), "positions": sh["positions"][c:d]}
        if "topk_ids" in sh:
            out.update({name: sh[name][c:d] for name in TOPK_COLUMNS})
        else:
            e, f = sh["sample_off"][c], sh["sample_off"][d]
            out["sample_len"] = sh["sample_len"][c:d]
            out.update({name: sh[name][e:f] for name in SAMPLED_COLUMNS})
        return out

    def lengths(self) -> Lengths:
        """Lengths per example, without touching the teacher columns."""
        parts = [(np.diff(sh["tok_off"]), sh["prompt_len"], np.diff(sh["pos_off"])) for sh in self._shards if sh]
        return Lengths(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3)))


def _flatten(table: pa.Table) -> dict:
    """A shard's columns as flat numpy arrays with offsets rebased to 0: tok_off (per example, into
    input_ids), pos_off (per example, into the stored positions), and the signal per position (top-k:
    (N, K) arrays; sampled: sample_off per position into flat sample arrays, and sample_len)."""
    table = table.combine_chunks()

    def flat(name):  # (offsets into .values, rebased; the values of this column's rows only)
        col = table.column(name).chunk(0)
        off = col.offsets.to_numpy()
        return off - off[0], col.values, off[0], off[-1]

    tok_off, tok, t0, _ = flat("input_ids")
    pos_off, pos, p0, _ = flat("positions")
    out = {"example_id": table.column("example_id").to_numpy(), "prompt_len": table.column("prompt_len").to_numpy(),
           "tok_off": tok_off, "input_ids": tok.to_numpy()[t0:], "pos_off": pos_off, "positions": pos.to_numpy()[p0:]}
    if "topk_ids" in table.column_names:
        for name in TOPK_COLUMNS:
            _, values, a, b = flat(name)
            if name == "tail_logprob":
                out[name] = values.to_numpy()[a:b]
            else:  # .values ignores any slice of the list array, hence [a:b]
                k = values.type.list_size
                out[name] = values.values.to_numpy().reshape(-1, k)[a:b]
        return out
    for name in SAMPLED_COLUMNS:
        _, per_position, a, b = flat(name)
        inner = per_position.offsets.to_numpy()[a:b + 1]
        out[name] = per_position.values.to_numpy()[inner[0]:inner[-1]]
        out["sample_off"] = inner - inner[0]
    out["sample_len"] = np.diff(out["sample_off"])
    return out
