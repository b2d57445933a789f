"""The teacher signals, one class each (docs/design.md, "Teacher signals"): everything that differs
between a top-k store and a sampled store lives here, and nowhere else names a signal.

A signal object owns, for its kind: its settings and Arrow fields; computing its rows from the
teacher's full-vocabulary log-probs (stage 1); the flat arrays of a shard, their columns, and back;
the value checks; its summary words and totals; and turning a micro-batch's rows into the loss's
teacher object (stage 2). The signal is chosen once: `signal_of(settings)` for a store,
`signal_for(teacher_cfg, vocab)` when writing one. A third signal is one more class here.

  TopK(k):      per position the k largest log-probs (normalized over the full vocabulary), their ids,
                and the exact log of the remaining mass -> loss.StoredTeacher (bucket KL).
  Sampled(N):   per position N draws from the full distribution (seeded per example), as unique ids,
                counts (sum N) and exact log-probs -> loss.SampledTeacher (unbiased KL).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import torch

from ..loss import SampledTeacher, StoredTeacher
from .format import SAMPLES_STREAM, ShardRows, StoreError, list_column

ARROW = {"uint16": pa.uint16(), "uint32": pa.uint32(), "float16": pa.float16(), "float32": pa.float32()}
VALUE_TOL = {"float16": 2e-3, "float32": 1e-4}  # |sum p - 1| allowed by the stored values' rounding


class _Signal:
    """What both signals share: the dtypes of a store's ids and values, and its bytes per position."""
    draws = False  # whether the signal depends on teacher.seed

    def __init__(self, id_dtype: str = "uint16", value_dtype: str = "float16"):
        self.id_dtype, self.value_dtype = id_dtype, value_dtype

    def shard_bytes(self, examples: int, tokens: int, positions: int, compression: str = "none") -> float:
        """Bytes of a shard of this many examples, tokens and stored positions, as the store writes it (without
        compression): a shard of one example, token and position, written, plus what each more of them adds
        (measured the same way), so the Arrow metadata and offsets are counted, not guessed. A sampled signal
        counts N unique ids per position: an upper bound."""
        n = 4096
        base = self._written(1, 1, 1, compression)
        per_token = (self._written(1, 1 + n, 1, compression) - base) / n
        per_position = (self._written(1, 1, 1 + n, compression) - base) / n
        per_example = (self._written(1 + n, 1 + n, 1 + n, compression) - base) / n - per_token - per_position
        return base + per_example * (examples - 1) + per_token * (tokens - 1) + per_position * (positions - 1)

    def widest_rows(self, positions: int, rng) -> dict:
        """Valid arrays of one example as large as this signal's rows can be (what `shard_bytes` writes)."""
        return self.random_rows(positions, rng)

    def _written(self, examples: int, tokens: int, positions: int, compression: str) -> int:
        from .files import write_shard
        rng = np.random.default_rng(0)
        counts = [positions - (examples - 1)] + [1] * (examples - 1)  # the positions over the examples
        sig = self.concat([self.widest_rows(c, rng) for c in counts])
        toks = [np.zeros(tokens - (examples - 1), np.int32)] + [np.zeros(1, np.int32)] * (examples - 1)
        rows = ShardRows(np.arange(examples), toks, np.ones(examples, np.int32),
                         [np.arange(c, dtype=np.int32) for c in counts], sig)
        tmp = tempfile.mkdtemp(prefix="selfaug-bytes-")
        try:
            return write_shard(os.path.join(tmp, "s.arrow"), rows.table(self), compression)["bytes"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def bytes_per_position(self, sig: dict, compression: str = "none") -> float:
        """Shard bytes per stored position of these arrays, written exactly as the store writes them."""
        from .files import write_shard
        n = self._positions(sig)
        rows = ShardRows(np.array([0]), [np.zeros(1, np.int32)], np.array([n], np.int32),
                         [np.arange(n, dtype=np.int32)], sig)
        tmp = tempfile.mkdtemp(prefix="selfaug-bytes-")
        try:
            return write_shard(os.path.join(tmp, "s.arrow"), rows.table(self), compression)["bytes"] / max(n, 1)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class TopK(_Signal):
    name = "topk"
    columns = ("topk_ids", "topk_logprobs", "tail_logprob")

    def __init__(self, k: int, id_dtype: str = "uint16", value_dtype: str = "float16"):
        super().__init__(id_dtype, value_dtype)
        self.k = k

    def settings(self) -> dict:
        return {"signal": self.name, "k": self.k, "samples": None}

    def fields(self) -> list:
        ids, vals = ARROW[self.id_dtype], ARROW[self.value_dtype]
        return [("topk_ids", pa.list_(pa.list_(ids, self.k))),  # fixed-size inner lists: no per-position offsets
                ("topk_logprobs", pa.list_(pa.list_(vals, self.k))),  # descending
                ("tail_logprob", pa.list_(pa.float32()))]  # log(1 - sum of p over the top-k), summed in fp32

    def words(self) -> str:
        """The signal in a summary or an error: its name and size."""
        return f"signal={self.name}, k={self.k}"

    def check_vocab(self, vocab: int) -> None:
        if self.k > vocab:
            raise StoreError(f"teacher.k={self.k} is larger than the vocabulary ({vocab})")

    # ---- stage 1 ----
    def row_fn(self, examples, positions, device):
        """fn(logp (n, V) fp32 log-probs of a chunk of rows, rows slice) -> {column: (n, ...) tensor}: the
        top-k ids and log-probs (descending) and the log of the remaining mass, summed over the tokens
        outside the top-k in fp32 (no 1 - sum cancellation)."""
        k = self.k

        def fn(logp, rows):
            v, i = torch.topk(logp, k, dim=-1)  # (n, K)
            tail = logp.exp_().scatter_(1, i, 0.0).sum(dim=-1).log()  # (n,); logp is the chunk's own buffer
            return {"topk_ids": i, "topk_logprobs": v, "tail_logprob": tail}
        return fn

    def per_example(self, part: dict) -> dict:
        return part

    def random_rows(self, positions: int, rng) -> dict:
        """Valid arrays of one example at `positions` positions, for benchmarks and tests (no model)."""
        logits = rng.normal(size=(positions, self.k + 1)) * 2
        logp = np.sort(logits - np.log(np.exp(logits).sum(1, keepdims=True)), axis=1)
        return {"topk_ids": np.tile(np.arange(self.k), (positions, 1)), "topk_logprobs": logp[:, :0:-1],
                "tail_logprob": logp[:, 0].astype(np.float32)}

    def concat(self, parts: list[dict]) -> dict:
        """One shard's arrays over its positions, in the store's dtypes: topk_ids (N, K),
        topk_logprobs (N, K), tail_logprob (N,) float32."""
        dtypes = {"topk_ids": self.id_dtype, "topk_logprobs": self.value_dtype, "tail_logprob": np.float32}
        empty = {"topk_ids": np.zeros((0, self.k)), "topk_logprobs": np.zeros((0, self.k)), "tail_logprob": np.zeros(0)}
        return {c: np.concatenate([p[c] for p in parts] or [empty[c]]).astype(dtypes[c]) for c in self.columns}

    def _positions(self, sig: dict) -> int:
        return len(sig["tail_logprob"])

    def arrays(self, sig: dict, offsets: pa.Array) -> list:
        out = []
        for name in ("topk_ids", "topk_logprobs"):
            dtype = ARROW[self.id_dtype if name == "topk_ids" else self.value_dtype]
            fixed = pa.FixedSizeListArray.from_arrays(pa.array(sig[name].reshape(-1), type=dtype), self.k)
            out.append(pa.ListArray.from_arrays(offsets, fixed))
        out.append(pa.ListArray.from_arrays(offsets, pa.array(sig["tail_logprob"], type=pa.float32())))
        return out

    def bad_positions(self, sig: dict) -> np.ndarray:
        """The stored positions with a non-finite log-prob or a NaN / +inf tail log-mass."""
        tail = sig["tail_logprob"]
        return np.nonzero(~np.isfinite(sig["topk_logprobs"].astype(np.float32)).all(axis=1) | np.isnan(tail)
                          | (tail == np.inf))[0]

    def entries(self, sig: dict) -> int:
        return int(sig["topk_ids"].size)

    def sidecar(self, sig: dict) -> dict:
        return {"tail_mass_sum": float(np.exp(sig["tail_logprob"].astype(np.float64)).sum())}

    def totals(self, sidecars: list[dict], positions: int) -> dict:
        return {"mean_tail_mass": sum(s["tail_mass_sum"] for s in sidecars) / max(positions, 1)}

    def summary(self, totals: dict) -> str:
        return f"mean tail mass {totals['mean_tail_mass']:.4f}"

    # ---- reading ----
    def flatten(self, table: pa.Table) -> dict:
        out = {}
        for name in self.columns:
            _, values, a, b = list_column(table, name)
            if name == "tail_logprob":
                out[name] = values.to_numpy()[a:b]
            else:
                out[name] = values.values.to_numpy().reshape(-1, self.k)[a:b]
        return out

    def slice(self, sh: dict, c: int, d: int) -> dict:
        """Positions [c, d) of a flattened shard."""
        return {name: sh[name][c:d] for name in self.columns}

    def check(self, sh: dict, where) -> list[str]:
        """Finite log-probs <= 0, a tail log-mass that is not NaN or > 0, and top-k + tail mass = 1 within
        the value dtype's rounding. `where(rows, what)` words a problem at the first of `rows`."""
        tol = VALUE_TOL[self.value_dtype]
        vals, tail = sh["topk_logprobs"].astype(np.float32), sh["tail_logprob"]
        problems = []
        for what, mask in (("a non-finite top-k log-prob", ~np.isfinite(vals).all(axis=1)),
                           ("a top-k log-prob > 0", (vals > tol).any(axis=1)),
                           ("a NaN or +inf tail log-mass", np.isnan(tail) | (tail == np.inf)),
                           ("a tail log-mass > 0", tail > tol)):
            if mask.any():
                problems.append(where(np.nonzero(mask)[0], what))
        if not problems:
            mass = np.exp(vals).sum(axis=1) + np.exp(tail)  # float32: its error (~1e-6) is far below tol
            off = np.nonzero(np.abs(mass - 1) > tol)[0]
            if len(off):
                problems.append(where(off, f"top-k + tail mass off 1 by more than {tol} ({mass[off[0]]:.6f})"))
        return problems

    # ---- stage 2 ----
    def teacher(self, rows: list[dict]) -> StoredTeacher:
        """The loss's teacher for these examples' rows, on the host in the stored widths (ids as int32, values
        as stored): `StoredTeacher.to_device` widens them on the device."""
        cat = lambda name: np.concatenate([r[name] for r in rows])
        return StoredTeacher(torch.from_numpy(cat("topk_ids").astype(np.int32)), torch.from_numpy(cat("topk_logprobs")),
                             torch.from_numpy(cat("tail_logprob").astype(np.float32)))


def sample_uniforms(seed: int, example_id: int, positions: int, samples: int) -> np.ndarray:
    """The uniforms in [0, 1) behind an example's sampled signal (positions, samples), seeded by
    (seed, example id) alone: the same draws on every rerun and at any world size."""
    return np.random.default_rng([seed, SAMPLES_STREAM, int(example_id)]).random((positions, samples))


def inverse_cdf_draws(logp: torch.Tensor, uniforms: torch.Tensor) -> dict:
    """Draws from each row's distribution by inverting its CDF at the given uniforms. logp (n, V) fp32
    log-probs, uniforms (n, N) in [0, 1) -> sample_ids (n, N) sorted per row, sample_logprobs (n, N)."""
    cdf = logp.exp().cumsum_(-1)  # (n, V) fp32
    total = cdf[:, -1:]  # which rounding leaves near 1
    # scaled by the total, and kept below it: a float64 uniform just under 1 rounds to 1.0 in fp32 (about once per
    # 2^25 draws), and searchsorted would then return V, past every id with probability
    scaled = torch.minimum(uniforms.to(cdf) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, scaled, right=True)  # (n, N): the first id whose cdf exceeds the draw
    ids = ids.sort(dim=-1).values
    return {"sample_ids": ids, "sample_logprobs": logp.gather(1, ids)}


def dedupe_samples(ids: np.ndarray, logprobs: np.ndarray) -> dict:
    """Sorted draws (n, N) per row -> unique ids with counts, flat, and the number per row."""
    n, N = ids.shape
    new = np.ones((n, N), dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.append(starts, n * N))
    return {"sample_len": new.sum(axis=1), "sample_ids": ids.ravel()[starts], "sample_counts": counts,
            "sample_logprobs": logprobs.ravel()[starts]}


def _entry_position(sample_len: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """The position index of each flat sample entry."""
    return np.searchsorted(np.cumsum(sample_len), entries, side="right")


class Sampled(_Signal):
    name = "sampled"
    draws = True
    columns = ("sample_ids", "sample_counts", "sample_logprobs")

    def __init__(self, samples: int, seed: int = 0, id_dtype: str = "uint16", value_dtype: str = "float16"):
        super().__init__(id_dtype, value_dtype)
        self.samples, self.seed = samples, seed

    def settings(self) -> dict:
        return {"signal": self.name, "k": None, "samples": self.samples}

    def fields(self) -> list:
        ids, vals = ARROW[self.id_dtype], ARROW[self.value_dtype]
        return [("sample_ids", pa.list_(pa.list_(ids))),  # per position: the unique sampled ids, ascending
                ("sample_counts", pa.list_(pa.list_(pa.uint16()))),  # how often each was drawn (sum N)
                ("sample_logprobs", pa.list_(pa.list_(vals)))]  # the exact log p of each

    def words(self) -> str:
        return f"signal={self.name}, N={self.samples}"

    def check_vocab(self, vocab: int) -> None:
        pass

    # ---- stage 1 ----
    def row_fn(self, examples, positions, device):
        """fn(logp (n, V), rows) -> N draws per row from the full distribution, by inverting its CDF at the
        example's seeded uniforms, and their exact log-probs; the draws sorted per row."""
        u = np.concatenate([sample_uniforms(self.seed, e.example_id, len(p), self.samples)
                            for e, p in zip(examples, positions)])
        uniforms = torch.from_numpy(u).to(device)  # (rows, N)

        return lambda logp, rows: inverse_cdf_draws(logp, uniforms[rows])

    def per_example(self, part: dict) -> dict:
        return dedupe_samples(part["sample_ids"], part["sample_logprobs"])

    def random_rows(self, positions: int, rng) -> dict:
        """Valid arrays of one example (draws from a uniform teacher over 64 ids), for benchmarks and tests."""
        draws = np.sort(rng.integers(0, 64, size=(positions, self.samples)), axis=1)
        return dedupe_samples(draws, np.full(draws.shape, -np.log(64.0)))

    def widest_rows(self, positions: int, rng) -> dict:
        """N distinct ids at every position (the most a position can store)."""
        draws = np.tile(np.arange(self.samples), (positions, 1))
        return dedupe_samples(draws, np.full(draws.shape, -np.log(self.samples)))

    def concat(self, parts: list[dict]) -> dict:
        """One shard's arrays: sample_len (N,) unique ids per position, and sample_ids, sample_counts
        (uint16), sample_logprobs flat over all of them."""
        dtypes = {"sample_len": np.int64, "sample_ids": self.id_dtype, "sample_counts": np.uint16,
                  "sample_logprobs": self.value_dtype}
        return {c: np.concatenate([p[c] for p in parts] or [np.zeros(0)]).astype(dt) for c, dt in dtypes.items()}

    def _positions(self, sig: dict) -> int:
        return len(sig["sample_len"])

    def arrays(self, sig: dict, offsets: pa.Array) -> list:
        inner = pa.array(np.concatenate([[0], np.cumsum(sig["sample_len"])]).astype(np.int32))
        types = {"sample_ids": ARROW[self.id_dtype], "sample_counts": pa.uint16(),
                 "sample_logprobs": ARROW[self.value_dtype]}
        return [pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(inner, pa.array(sig[c], type=types[c])))
                for c in self.columns]

    def bad_positions(self, sig: dict) -> np.ndarray:
        bad = np.nonzero(~np.isfinite(sig["sample_logprobs"].astype(np.float32)))[0]
        return np.unique(_entry_position(sig["sample_len"], bad))

    def entries(self, sig: dict) -> int:
        return int(len(sig["sample_ids"]))

    def sidecar(self, sig: dict) -> dict:
        return {}

    def totals(self, sidecars: list[dict], positions: int) -> dict:
        return {}

    def summary(self, totals: dict) -> str:
        return f"{totals['entries_per_position']:.2f} unique ids per position of {self.samples} samples"

    # ---- reading ----
    def flatten(self, table: pa.Table) -> dict:
        out = {}
        for name in self.columns:
            _, per_position, a, b = list_column(table, name)
            inner = per_position.offsets.to_numpy()[a:b + 1]
            out[name] = per_position.values.to_numpy()[inner[0]:inner[-1]]
            out["sample_off"] = inner - inner[0]
        out["sample_len"] = np.diff(out["sample_off"])
        return out

    def slice(self, sh: dict, c: int, d: int) -> dict:
        e, f = sh["sample_off"][c], sh["sample_off"][d]
        return {"sample_len": sh["sample_len"][c:d], **{name: sh[name][e:f] for name in self.columns}}

    def check(self, sh: dict, where) -> list[str]:
        """At least one sample per position, counts that sum to N, finite log-probs <= 0 whose mass is
        at most 1."""
        tol = VALUE_TOL[self.value_dtype]
        n_len = sh["sample_len"]
        if (n_len < 1).any():
            return [where(np.nonzero(n_len < 1)[0], "a position without samples")]
        starts = sh["sample_off"][:-1]
        vals = sh["sample_logprobs"].astype(np.float32)
        sums = np.add.reduceat(sh["sample_counts"].astype(np.int64), starts)
        per_position = lambda entry_mask: np.unique(_entry_position(n_len, np.nonzero(entry_mask)[0]))
        problems = []
        for what, rows in ((f"sample counts that do not sum to teacher.samples={self.samples}",
                            np.nonzero(sums != self.samples)[0]),
                           ("a non-finite sampled log-prob", per_position(~np.isfinite(vals))),
                           ("a sampled log-prob > 0", per_position(vals > tol))):
            if len(rows):
                problems.append(where(rows, what))
        if not problems:
            mass = np.add.reduceat(np.exp(vals), starts)
            over = np.nonzero(mass > 1 + tol)[0]
            if len(over):
                problems.append(where(over, f"sampled ids whose mass exceeds 1 ({mass[over[0]]:.6f})"))
        return problems

    # ---- stage 2 ----
    def teacher(self, rows: list[dict]) -> SampledTeacher:
        """The loss's teacher for these examples' rows, on the host (`SampledTeacher.to_device` moves it)."""
        cat = lambda name: np.concatenate([r[name] for r in rows])
        return sampled_teacher(cat("sample_len"), cat("sample_ids"), cat("sample_counts"), cat("sample_logprobs"),
                               self.samples)


def sampled_teacher(sample_len, ids, counts, logprobs, samples: int) -> SampledTeacher:
    """The flat unique ids of the stored positions (sample_len per position) as a SampledTeacher:
    (positions, most unique ids) matrices, weight counts / N, 0 on padding."""
    n_len = np.asarray(sample_len, dtype=np.int64)
    row = np.repeat(np.arange(len(n_len)), n_len)
    col = np.arange(len(row)) - np.repeat(np.cumsum(n_len) - n_len, n_len)
    width = int(n_len.max()) if len(n_len) else 1
    out_ids, weights, logp = (np.zeros((len(n_len), width), dt) for dt in (np.int32, np.float32, np.float32))
    out_ids[row, col], weights[row, col], logp[row, col] = ids, np.asarray(counts) / samples, logprobs
    return SampledTeacher(*(torch.from_numpy(a) for a in (out_ids, weights, logp)))


def signal_of(settings: dict) -> TopK | Sampled:
    """The signal of a store's settings."""
    kind = settings.get("signal", "topk")
    ids, vals = settings.get("id_dtype", "uint16"), settings.get("value_dtype", "float16")
    if kind == "topk":
        return TopK(settings["k"], ids, vals)
    if kind == "sampled":
        return Sampled(settings["samples"], settings.get("seed") or 0, ids, vals)
    raise StoreError(f"unknown teacher signal {kind!r} in the store's settings; recompute the store")


def signal_for(teacher_cfg, vocab_size: int) -> TopK | Sampled:
    """The signal a recipe's teacher section writes, for a model of this vocabulary."""
    from .format import id_dtype_for
    t = teacher_cfg
    return signal_of({"signal": t.signal, "k": t.k, "samples": t.samples, "seed": t.seed,
                      "id_dtype": id_dtype_for(vocab_size), "value_dtype": t.value_dtype})
