"""The teacher store: sharded Arrow IPC stream files plus a manifest (DESIGN.md, "Stage 1").

One row per example: example_id, input_ids, prompt_len, positions, topk_ids, topk_logprobs,
tail_logprob. This module owns the format: the schema, writing one shard atomically, the
manifest, verification, and memory-mapped reading for stage 2.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .hashing import sha256_file

FORMAT = "selfaug-teacher-store"
VERSION = 1
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    pass


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest id type that holds the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def schema(k: int, id_dtype: str, value_dtype: str) -> pa.Schema:
    ids = {"uint16": pa.uint16(), "uint32": pa.uint32()}[id_dtype]
    vals = {"float16": pa.float16(), "float32": pa.float32()}[value_dtype]
    return pa.schema([
        ("example_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("positions", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.list_(ids, k))),  # fixed-size inner lists: no per-position offsets
        ("topk_logprobs", pa.list_(pa.list_(vals, k))),  # descending
        ("tail_logprob", pa.list_(pa.float32())),  # log(1 - sum of p over the top-k), from fp32
    ])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


@dataclass
class ShardRows:
    """The rows of one shard, as flat numpy arrays (positions of all examples concatenated)."""
    example_id: np.ndarray  # (R,) int64
    input_ids: list  # R arrays of int32
    prompt_len: np.ndarray  # (R,) int32
    positions: list  # R arrays of int32
    topk_ids: np.ndarray  # (N, K) uint16|uint32, N = total stored positions
    topk_logprobs: np.ndarray  # (N, K) float16|float32
    tail_logprob: np.ndarray  # (N,) float32

    def table(self, sch: pa.Schema) -> pa.Table:
        k = sch.field("topk_ids").type.value_type.list_size
        counts = np.array([len(p) for p in self.positions], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        ids_t = sch.field("topk_ids").type.value_type.value_type
        val_t = sch.field("topk_logprobs").type.value_type.value_type
        ids = pa.FixedSizeListArray.from_arrays(pa.array(self.topk_ids.reshape(-1), type=ids_t), k)
        vals = pa.FixedSizeListArray.from_arrays(pa.array(self.topk_logprobs.reshape(-1), type=val_t), k)
        cols = [
            pa.array(self.example_id, type=pa.int64()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.input_ids], type=pa.list_(pa.int32())),
            pa.array(self.prompt_len, type=pa.int32()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.positions], type=pa.list_(pa.int32())),
            pa.ListArray.from_arrays(offsets, ids),
            pa.ListArray.from_arrays(offsets, vals),
            pa.ListArray.from_arrays(offsets, pa.array(self.tail_logprob, type=pa.float32())),
        ]
        return pa.Table.from_arrays(cols, schema=sch)


def write_shard(path: str, table: pa.Table, compression: str = "none") -> dict:
    """Write under a temporary name, fsync, rename: a shard file is either whole or absent."""
    tmp = path + ".tmp"
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    with pa.OSFile(tmp, "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": os.path.join("shards", os.path.basename(path)), "rows": table.num_rows,
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def read_manifest(store_dir: str) -> dict:
    path = os.path.join(store_dir, MANIFEST)
    if not os.path.exists(path):
        raise StoreError(f"{store_dir} is not a teacher store (no {MANIFEST}); run `selfaug precompute` first")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{path}: store format version {manifest.get('version')} is not {VERSION}; recompute it")
    return manifest


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def settings_diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested settings dicts."""
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (store: {b!r}, expected: {a!r})")
    return out


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


def verify_store(store_dir: str, mode: str = "sha256") -> tuple[dict, list[str]]:
    manifest = read_manifest(store_dir)
    if manifest.get("status") != "complete":
        return manifest, ["the store is incomplete: run `selfaug precompute` again to finish it"]
    problems = [p for p in (verify_shard(store_dir, e, mode) for e in manifest["shards"]) if p]
    return manifest, problems


class TeacherStore:
    """Memory-mapped read access to a verified store: example i -> tokens and teacher signal."""

    def __init__(self, store_dir: str, verify: str = "sha256"):
        manifest, problems = verify_store(store_dir, verify)
        if problems:
            raise StoreError(f"teacher store {store_dir} failed verification: " + "; ".join(problems)
                             + ". Re-run `selfaug precompute` (it rewrites the shards that fail).")
        self.dir, self.manifest = store_dir, manifest
        self.k = manifest["settings"]["k"]
        self._shards = []  # per shard: dict of numpy arrays
        self._index = []  # (shard, row) per example, in store order
        for s, entry in enumerate(manifest["shards"]):
            with pa.memory_map(os.path.join(store_dir, entry["file"])) as source:
                table = pa.ipc.open_stream(source).read_all()
            self._shards.append(_flatten(table))
            self._index += [(s, r) for r in range(table.num_rows)]

    def __len__(self) -> int:
        return len(self._index)

    def example(self, i: int) -> dict:
        s, r = self._index[i]
        sh = self._shards[s]
        a, b = sh["tok_off"][r], sh["tok_off"][r + 1]
        c, d = sh["pos_off"][r], sh["pos_off"][r + 1]
        return {"example_id": int(sh["example_id"][r]), "input_ids": sh["input_ids"][a:b],
                "prompt_len": int(sh["prompt_len"][r]), "positions": sh["positions"][c:d],
                "topk_ids": sh["topk_ids"][c:d], "topk_logprobs": sh["topk_logprobs"][c:d],
                "tail_logprob": sh["tail_logprob"][c:d]}

    def lengths(self) -> list[tuple[int, int, int]]:
        """(tokens, prompt_len, stored positions) per example, without touching the teacher columns."""
        out = []
        for s, r in self._index:
            sh = self._shards[s]
            out.append((int(sh["tok_off"][r + 1] - sh["tok_off"][r]), int(sh["prompt_len"][r]),
                        int(sh["pos_off"][r + 1] - sh["pos_off"][r])))
        return out


def _flatten(table: pa.Table) -> dict:
    table = table.combine_chunks()

    def flat(name):
        col = table.column(name).chunk(0)
        return col.offsets.to_numpy(), col.values

    tok_off, tok = flat("input_ids")
    pos_off, pos = flat("positions")
    _, ids = flat("topk_ids")
    _, vals = flat("topk_logprobs")
    _, tail = flat("tail_logprob")
    k = ids.type.list_size
    # .values ignores any slice of the list array, so offsets are rebased to start at 0
    return {"example_id": table.column("example_id").to_numpy(), "prompt_len": table.column("prompt_len").to_numpy(),
            "tok_off": tok_off - tok_off[0], "input_ids": tok.to_numpy()[tok_off[0]:],
            "pos_off": pos_off - pos_off[0], "positions": pos.to_numpy()[pos_off[0]:],
            "topk_ids": ids.values.to_numpy().reshape(-1, k)[pos_off[0]:],
            "topk_logprobs": vals.values.to_numpy().reshape(-1, k)[pos_off[0]:],
            "tail_logprob": tail.to_numpy()[pos_off[0]:]}
