"""Stage 2's batches (docs/design.md, "Stage 2"): a seeded, resumable assignment of examples to
optimizer steps, ranks and micro-batches (by count, or by `train.batch_tokens`), and collation,
padded or packed (`train.packing`).

Every rank can compute the whole global batch of a step, so the token counts that normalize the
loss (all micro-batches, all ranks) are known before the first forward, with no communication.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import store


def pack(lengths: list[int], capacity: int, cost=lambda rows, width: rows * width) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of each sequence: the layout of least `cost(rows, widest row)` among those that place the
    sequences longest first onto the emptiest of R rows, R = 1..n, no row over `capacity`. R = n is one
    sequence per row, so packing never costs more than padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for n_rows in range(1, len(lengths) + 1):
        fill = np.zeros(n_rows, np.int64)
        row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
        for i in order:
            r = int(fill.argmin())
            row[i], offset[i] = r, fill[r]
            fill[r] += lengths[i]
        price = cost(n_rows, int(fill.max()))
        if fill.max() <= capacity and (best is None or price < best[0]):
            best = (price, row, offset)
    return best[1], best[2]


# ---- layouts: how a micro-batch's examples become the decoder's rows ----------------------------------

class Padded:
    """One right-padded row per example, with an attention mask: right under every attention
    implementation (flash-attention unpads by the mask; right padding is causal-safe everywhere)."""
    name = "padded"
    packed = False

    def place(self, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(lengths)), np.zeros(len(lengths), np.int64)

    def processed_tokens(self, lengths) -> int:
        return len(lengths) * int(max(lengths)) if len(lengths) else 0


class MaskedPacking:
    """sdpa, eager, flex_attention: rows of at most `capacity` tokens, position_ids restarting at each example
    and no attention mask; transformers builds a block-diagonal causal mask from the position ids
    (`masking_utils.find_packed_sequence_indices`), one block per example (a row's trailing padding a block of
    its own). The mask and the attention work grow with a row's width squared, so each micro-batch takes the
    layout of R = 1..n rows of least estimated cost R * W * (1 + W / attention_width) (`models.attention_width`:
    the width at which a masked row's attention costs what its linear layers cost); R = n is padding's cost."""
    name = "packed rows, block-diagonal mask"
    packed = True

    def __init__(self, capacity: int, attention_width: float):
        self.capacity, self.attention_width = capacity, attention_width

    def cost(self, rows: int, width: int) -> float:
        return rows * width * (1 + width / self.attention_width)

    def place(self, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return pack(lengths, self.capacity, self.cost)

    def processed_tokens(self, lengths) -> int:
        if len(lengths) == 0:
            return 0
        row, offset = self.place([int(n) for n in lengths])
        return (int(row.max()) + 1) * int(max(offset + np.asarray(lengths)))


class VarlenPacking:
    """flash-attention (2, 3, hub kernels) and any other attention function registered with transformers: they
    separate packed examples only in a batch of one row (restarting position_ids) or with explicit varlen
    arguments (`_is_packed_sequence`, `_flash_attention_forward`); a multi-row packed batch would attend across
    examples. So a micro-batch is one flat row of all its examples, position_ids restarting at each, and
    `cu_seq_lens_q/k`, `max_length_q/k` passed to the model: each example attends only to itself, no token is
    padding, and the attention work is each example's own."""
    name = "one packed row, varlen (cu_seq_lens)"
    packed = True

    def place(self, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(lengths), np.int64), np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)

    def processed_tokens(self, lengths) -> int:
        return int(np.sum(lengths))


Layout = Padded | MaskedPacking | VarlenPacking
PADDED = Padded()
MASK_BUILDERS = ("sdpa", "eager", "flex_attention")  # transformers masks packed position_ids apart for these


def layout_for(attn_implementation: str, packing: bool, capacity: int | None = None,
               attention_width: float | None = None) -> Layout:
    """The one decision of how micro-batches are laid out (train.packing and the model's attention)."""
    if not packing:
        return PADDED
    if attn_implementation in MASK_BUILDERS:
        return MaskedPacking(capacity, attention_width)
    return VarlenPacking()


def collate(rows: list[dict], pad_id: int, layout: Layout = PADDED) -> dict:
    """The host tensors of a micro-batch in the layout's rows (ids as int32: `to_device` widens them there):
    input_ids, `labels` (the response token predicted at each position, else -100), the KL rows rows_b and
    rows_t (in example order: the teacher's order), and the layout's own inputs (an attention mask, restarting
    position_ids, varlen arguments); `tokens` (the examples') and `padded_tokens` (what the model processes)."""
    lens = [len(r["input_ids"]) for r in rows]
    where_row, where_off = layout.place(lens)
    n_rows = int(where_row.max()) + 1
    width = max(int(where_off[i] + lens[i]) for i in range(len(rows)))
    input_ids = np.full((n_rows, width), pad_id, dtype=np.int32)
    labels = np.full((n_rows, width), -100, dtype=np.int32)
    for r, ex in enumerate(rows):
        b, o, n, p = where_row[r], where_off[r], lens[r], ex["prompt_len"]
        ids = np.asarray(ex["input_ids"], dtype=np.int32)
        input_ids[b, o:o + n] = ids
        labels[b, o + p - 1:o + n - 1] = ids[p:]  # position t predicts token t + 1: the response tokens
    rows_b = np.concatenate([np.full(len(r["positions"]), where_row[i], dtype=np.int32) for i, r in enumerate(rows)])
    rows_t = np.concatenate([np.asarray(r["positions"], dtype=np.int32) + where_off[i] for i, r in enumerate(rows)])
    nll_rows = np.flatnonzero(labels.reshape(-1) != -100).astype(np.int32)  # on the host: no device sync for it
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "rows_b": torch.from_numpy(rows_b), "rows_t": torch.from_numpy(rows_t.astype(np.int32)),
             "nll_rows": torch.from_numpy(nll_rows), "tokens": sum(lens), "padded_tokens": n_rows * width}
    if not layout.packed:
        mask = np.arange(width)[None, :] < np.asarray(lens)[:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int32))
        return batch
    # restarting at every example, and at the padding after a row's last one (a block of its own)
    position_ids = np.zeros((n_rows, width), dtype=np.int32)
    fill = np.zeros(n_rows, np.int64)
    for r in range(len(rows)):
        b, o, n = where_row[r], where_off[r], lens[r]
        position_ids[b, o:o + n] = np.arange(n)
        fill[b] = max(fill[b], o + n)
    for b in range(n_rows):
        position_ids[b, fill[b]:] = np.arange(width - fill[b])
    batch["position_ids"] = torch.from_numpy(position_ids)
    if isinstance(layout, VarlenPacking):  # one row, no padding: the examples' boundaries in order
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    return batch


WIDE = ("input_ids", "labels", "rows_b", "rows_t", "nll_rows", "attention_mask", "position_ids")  # int64 on device


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch's tensors on `device` (from pinned memory when the host side is pinned), the token ids, labels,
    KL rows, mask and position ids widened to int64 there (transferred in their int32 width); the varlen
    boundaries stay int32, as flash-attention takes them; the teacher object moves itself."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=non_blocking)
            out[key] = value.long() if key in WIDE else value
        elif hasattr(value, "to_device"):
            out[key] = value.to_device(device, non_blocking)
        else:
            out[key] = value
    return out


VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict) -> dict:
    """The decoder's inputs of a collated batch: ids and the layout's own (an attention mask, packed
    position_ids, varlen arguments). No KV cache: transformers 5 masks packed sequences apart only when there
    is none (with one, the packed examples would silently attend to each other; tests/test_long_rag.py)."""
    keys = ("input_ids", "attention_mask", "position_ids") + VARLEN
    return {"use_cache": False, **{k: batch[k] for k in keys if k in batch}}


def processed_tokens(lengths, layout: Layout = PADDED) -> int:
    """Tokens a micro-batch of these example lengths occupies as the model sees it, in the layout."""
    return layout.processed_tokens(list(lengths))


class StepSampler:
    """Global batch of optimizer step s = the next G = micro * accum * world examples of a stream of
    seeded permutations (one per epoch), and its plan: the micro-batches of each rank.

    By count (default): micro-batch m of rank r = slice (m * world + r) of the global batch.
    By tokens (`train.micro_batch_tokens`): the global batch is shared out over the ranks longest first, each to the
    rank with the fewest tokens so far; each rank's share is cut first-fit, longest first, into
    micro-batches of at most `batch_tokens` processed tokens (`processed_tokens`); every rank runs as
    many micro-batches as the rank with the most, an empty one (None) where it has fewer, so that
    ZeRO's collectives stay matched. Either way every rank computes the whole plan, with no communication.

    `shard_rows` (train.order=shards): each epoch visits the store's shards in a seeded order, each shard's
    examples in a seeded order, and deals that sequence to the ranks in `world` contiguous parts of n // world
    examples (the n mod world left after the last part are named by `left_out` and differ by epoch); rank r's
    step s is the next micro x accum examples of its part. A rank then reads a run of about n_shards / world
    shards per epoch, one after the other (`shard_runs`), which is what lets it download only those
    (`store.ShardCache`). By tokens, each rank cuts its own examples of the step."""

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int, tokens: np.ndarray | None = None,
                 batch_tokens: int | None = None, layout: Layout = PADDED, shard_rows: list[int] | None = None):
        if n < micro * accum * world:
            raise ValueError(f"{n} examples cannot fill one global batch of {micro * accum * world} "
                             "(micro_batch_size x gradient_accumulation_steps x world size)")
        self.n, self.micro, self.accum, self.world, self.seed = n, micro, accum, world, seed
        self.tokens, self.batch_tokens, self.layout = tokens, batch_tokens, layout
        self.shard_rows = shard_rows
        if shard_rows is not None:
            if sum(shard_rows) != n:
                raise ValueError(f"the shards hold {sum(shard_rows)} examples, not {n}")
            self.part = n // world  # each rank's examples per epoch
            self.left_out = n - self.part * world
            self.shard_of = np.repeat(np.arange(len(shard_rows)), shard_rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of the n examples (by shards: shard after shard, in seeded orders). The last few epochs
        are kept (a dict replaced whole): the loop, the prefetch thread and the shard downloads each ask, and a
        step that crosses an epoch asks for two, once per rank."""
        cache = getattr(self, "_cache", {})
        if epoch not in cache:
            rng = np.random.default_rng([self.seed, epoch])
            if self.shard_rows is None:
                order = rng.permutation(self.n)
            else:
                first = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]])
                order = np.concatenate([first[s] + rng.permutation(self.shard_rows[s])
                                        for s in rng.permutation(len(self.shard_rows))])
            cache = {**{e: p for e, p in cache.items() if abs(e - epoch) <= 2}, epoch: order}
            self._cache = cache
        return cache[epoch]

    def _stream(self, rank: int, start: int, count: int) -> list[int]:
        """train.order=shards: examples start .. start+count of rank's stream (its part of each epoch in turn)."""
        out = []
        while len(out) < count:
            epoch, offset = divmod(start + len(out), self.part)
            base = rank * self.part
            out.extend(self._permutation(epoch)[base + offset: base + min(self.part, offset + count - len(out))].tolist())
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """The step's examples: by default the next G of the epochs' permutations; by shards, each rank's next
        micro x accum of its stream, rank after rank."""
        g = self.micro * self.accum * self.world
        if self.shard_rows is not None:
            per = self.micro * self.accum
            return np.asarray([i for r in range(self.world) for i in self._stream(r, step * per, per)])
        start, out = step * g, []
        while len(out) < g:
            epoch, offset = divmod(start + len(out), self.n)
            out.extend(self._permutation(epoch)[offset: offset + g - len(out)].tolist())
        return np.asarray(out)

    def shard_runs(self, rank: int, step: int, stop: int):
        """train.order=shards: the shards rank reads in steps `step` .. `stop`-1, in order, as (shard, first, end): the
        run of its stream positions [first, end) that read that shard (a shard comes back in a later epoch)."""
        pos, last = step * self.micro * self.accum, stop * self.micro * self.accum
        epoch, offset = divmod(pos, self.part)
        while pos < last:
            part = self._permutation(epoch)[rank * self.part + offset: (rank + 1) * self.part][:last - pos]
            shards = self.shard_of[part]
            cuts = np.flatnonzero(np.diff(shards)) + 1
            for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(part)]])):
                yield int(shards[a]), pos + int(a), pos + int(b)
            pos += len(part)
            epoch, offset = epoch + 1, 0

    def plan(self, step: int) -> list[list[np.ndarray | None]]:
        """plan[rank][m]: the example indices of micro-batch m of each rank (None: an empty one). The last step's
        plan is kept (one (step, plan) pair, replaced whole): the loop and the prefetch thread each ask for it."""
        cached = getattr(self, "_plan", None)
        if cached is not None and cached[0] == step:
            return cached[1]
        plan = self._plan_of(step)
        self._plan = (step, plan)
        return plan

    def _plan_of(self, step: int) -> list[list[np.ndarray | None]]:
        batch = self.global_batch(step)
        per = self.micro * self.accum
        if self.batch_tokens is None and self.shard_rows is not None:  # each rank its own stream's examples
            return [[batch[r * per + m * self.micro: r * per + (m + 1) * self.micro] for m in range(self.accum)]
                    for r in range(self.world)]
        if self.batch_tokens is None:
            return [[batch[(m * self.world + r) * self.micro:(m * self.world + r + 1) * self.micro]
                     for m in range(self.accum)] for r in range(self.world)]
        lens = self.tokens[batch].tolist()
        if self.shard_rows is not None:  # each rank cuts its own stream's examples, longest first
            shares = [sorted(range(r * per, (r + 1) * per), key=lambda i: -lens[i]) for r in range(self.world)]
        else:
            shares, load = [[] for _ in range(self.world)], [0] * self.world
            for i in sorted(range(len(lens)), key=lambda i: -lens[i]):  # longest first, onto the least-loaded rank
                r = load.index(min(load))
                shares[r].append(i)
                load[r] += lens[i]
        plan = []
        for share in shares:  # already longest first
            cut, cut_lens, cut_sums = [], [], []
            for i in share:
                for j, (mb, mb_lens) in enumerate(zip(cut, cut_lens)):
                    # the tokens themselves bound any layout from below: most misfits are found without one
                    if cut_sums[j] + lens[i] <= self.batch_tokens and \
                            self.layout.processed_tokens(mb_lens + [lens[i]]) <= self.batch_tokens:
                        mb.append(i), mb_lens.append(lens[i])
                        cut_sums[j] += lens[i]
                        break
                else:
                    cut.append([i]), cut_lens.append([lens[i]]), cut_sums.append(lens[i])
            plan.append([batch[mb] for mb in cut])
        most = max(len(p) for p in plan)
        return [p + [None] * (most - len(p)) for p in plan]

    def plan_stats(self, plan) -> dict:
        """What a step's plan processes: micro-batches per rank, empty ones over all ranks, and the
        processed tokens per (non-empty) micro-batch, largest and mean."""
        sizes = [self.layout.processed_tokens(list(self.tokens[mb])) for p in plan for mb in p if mb is not None]
        return {"micro_batches": len(plan[0]), "empty_micro_batches": sum(mb is None for p in plan for mb in p),
                "mb_tokens_max": max(sizes), "mb_tokens_mean": float(np.mean(sizes))}


def step_counts(lengths: store.Lengths, indices) -> tuple[int, int]:
    """(response tokens predicted, KL positions) over the examples of a global batch."""
    idx = np.asarray(indices)
    return int((lengths.tokens[idx] - lengths.prompt[idx]).sum()), int(lengths.kl[idx].sum())
