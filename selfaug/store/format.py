"""The store's format (docs/design.md, "The teacher store"): which positions it holds (`PositionRule`),
the shard schema and its rows (`ShardRows`, `flatten`), and the names of its files. What differs
between signals is asked of the store's signal object (`signals.py`); nothing here names a signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from ..errors import SelfAugError

FORMAT = "selfaug-teacher-store"
VERSION = 2  # 2: the signal and the position rule in the settings
MANIFEST = "manifest.json"
COMMON_FIELDS = (("example_id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("prompt_len", pa.int32()),
                 ("positions", pa.list_(pa.int32())))


class StoreError(SelfAugError, RuntimeError):
    pass


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
    def of(cls, teacher_cfg) -> "PositionRule":
        """The rule of a TeacherConfig."""
        t = teacher_cfg
        return cls(t.positions, t.position_fraction, t.max_positions, t.seed)

    @classmethod
    def of_settings(cls, settings: dict) -> "PositionRule":
        return cls(settings["positions"], settings.get("position_fraction", 1.0), settings.get("max_positions"),
                   settings.get("seed") or 0)

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
        rng = np.random.default_rng([self.seed, POSITIONS_STREAM, int(example_id)])
        return (np.sort(rng.choice(n, keep, replace=False)) + lo).astype(np.int32)


POSITIONS_STREAM, SAMPLES_STREAM = 1, 2  # independent seeded streams per example


class Lengths(NamedTuple):
    """Per example: sequence tokens, prompt tokens and stored KL positions (numpy arrays)."""
    tokens: np.ndarray
    prompt: np.ndarray
    kl: np.ndarray


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest id type that holds the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def schema(signal) -> pa.Schema:
    """The shard schema: the common columns, then the signal's."""
    return pa.schema(list(COMMON_FIELDS) + signal.fields())


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


@dataclass
class ShardRows:
    """The rows of one shard as flat numpy arrays: the stored positions of all examples concatenated,
    and `signal`, the signal's own arrays over those positions (see its `concat`)."""
    example_id: np.ndarray  # (R,) int64
    input_ids: list  # R arrays of int32
    prompt_len: np.ndarray  # (R,) int32
    positions: list  # R arrays of int32
    signal: dict

    def table(self, signal) -> pa.Table:
        counts = np.array([len(p) for p in self.positions], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        cols = [
            pa.array(self.example_id, type=pa.int64()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.input_ids], type=pa.list_(pa.int32())),
            pa.array(self.prompt_len, type=pa.int32()),
            pa.array([np.asarray(x, dtype=np.int32) for x in self.positions], type=pa.list_(pa.int32())),
        ]
        return pa.Table.from_arrays(cols + signal.arrays(self.signal, offsets), schema=schema(signal))

    def position_count(self) -> int:
        return int(sum(len(p) for p in self.positions))

    def where(self, flat_position: int) -> tuple[int, int]:
        """(example id, position t) of the i-th stored position of the shard."""
        counts = np.cumsum([len(p) for p in self.positions])
        e = int(np.searchsorted(counts, flat_position, side="right"))
        return int(self.example_id[e]), int(self.positions[e][flat_position - (counts[e - 1] if e else 0)])


def list_column(table: pa.Table, name: str):
    """(offsets rebased to 0, the list's child array, first and last child index of this column's rows).
    .values ignores any slice of the list array, hence the indices."""
    col = table.column(name).chunk(0)
    off = col.offsets.to_numpy()
    return off - off[0], col.values, off[0], off[-1]


def flatten(table: pa.Table, signal) -> dict:
    """A shard's columns as flat numpy arrays (views of the memory-mapped file where Arrow allows) with
    offsets rebased to 0: tok_off (per example, into input_ids), pos_off (per example, into the stored
    positions), and the signal's own arrays per position (`signal.flatten`)."""
    if table.column(0).num_chunks != 1:
        table = table.combine_chunks()  # a shard is written as one record batch: this is not taken
    tok_off, tok, t0, _ = list_column(table, "input_ids")
    pos_off, pos, p0, _ = list_column(table, "positions")
    out = {"example_id": table.column("example_id").to_numpy(), "prompt_len": table.column("prompt_len").to_numpy(),
           "tok_off": tok_off, "input_ids": tok.to_numpy()[t0:], "pos_off": pos_off, "positions": pos.to_numpy()[p0:]}
    out.update(signal.flatten(table))
    return out
