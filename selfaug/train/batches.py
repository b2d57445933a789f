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


def pack(lengths: list[int], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of each sequence: the layout that processes the fewest tokens (rows x widest row)
    among those that place the sequences longest first onto the emptiest of R rows, R = 1..n, no row
    over `capacity`. R = n is one sequence per row, so packing never processes more than padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for n_rows in range(1, len(lengths) + 1):
        fill = np.zeros(n_rows, np.int64)
        row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
        for i in order:
            r = int(fill.argmin())
            row[i], offset[i] = r, fill[r]
            fill[r] += lengths[i]
        cost = n_rows * int(fill.max())
        if fill.max() <= capacity and (best is None or cost < best[0]):
            best = (cost, row, offset)
    return best[1], best[2]


def collate(rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
    """The tensors of a micro-batch. Unpacked: one right-padded row per example with an attention mask.
    Packed (`pack_tokens`): the examples placed by `pack`, with position_ids restarting at each one and
    no attention mask (transformers then masks attention block-diagonally, one block per example; the
    trailing padding of a row is a block of its own). Either way `labels` (the response tokens
    predicted at each position, else -100) and the KL rows (rows_b, rows_t, in example order: the
    teacher's order) are mapped to the layout."""
    lens = [len(r["input_ids"]) for r in rows]
    if pack_tokens is None:
        where_row, where_off = np.arange(len(rows)), np.zeros(len(rows), np.int64)
    else:
        where_row, where_off = pack(lens, pack_tokens)
    n_rows = int(where_row.max()) + 1
    width = max(int(where_off[i] + lens[i]) for i in range(len(rows)))
    input_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    labels = np.full((n_rows, width), -100, dtype=np.int64)
    for r, ex in enumerate(rows):
        b, o, n, p = where_row[r], where_off[r], lens[r], ex["prompt_len"]
        ids = np.asarray(ex["input_ids"], dtype=np.int64)
        input_ids[b, o:o + n] = ids
        labels[b, o + p - 1:o + n - 1] = ids[p:]  # position t predicts token t + 1: the response tokens
    rows_b = np.concatenate([np.full(len(r["positions"]), where_row[i]) for i, r in enumerate(rows)])
    rows_t = np.concatenate([np.asarray(r["positions"], dtype=np.int64) + where_off[i] for i, r in enumerate(rows)])
    batch = {"input_ids": torch.from_numpy(input_ids).to(device), "labels": torch.from_numpy(labels).to(device),
             "rows_b": torch.as_tensor(rows_b, dtype=torch.long, device=device),
             "rows_t": torch.as_tensor(rows_t, dtype=torch.long, device=device),
             "tokens": sum(lens), "padded_tokens": n_rows * width}
    if pack_tokens is None:
        mask = np.arange(width)[None, :] < np.asarray(lens)[:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64)).to(device)
    else:  # restarting at every example, and at the padding after a row's last one (a block of its own)
        position_ids = np.zeros((n_rows, width), dtype=np.int64)
        fill = np.zeros(n_rows, np.int64)
        for r in range(len(rows)):
            b, o, n = where_row[r], where_off[r], lens[r]
            position_ids[b, o:o + n] = np.arange(n)
            fill[b] = max(fill[b], o + n)
        for b in range(n_rows):
            position_ids[b, fill[b]:] = np.arange(width - fill[b])
        batch["position_ids"] = torch.from_numpy(position_ids).to(device)
    return batch


def model_inputs(batch: dict) -> dict:
    """The decoder's inputs of a collated batch (an attention mask, or packed position_ids). No KV cache:
    transformers 5 masks packed sequences apart only when there is none (with one, the packed
    examples would silently attend to each other; tests/test_long_rag.py checks both)."""
    return {"use_cache": False, **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}}


def processed_tokens(lengths, pack_tokens: int | None = None) -> int:
    """Tokens a micro-batch of these example lengths occupies as the model sees it: n x the longest
    (padded rows), or rows x widest row of the layout `pack` picks (train.packing)."""
    if len(lengths) == 0:
        return 0
    if pack_tokens is None:
        return len(lengths) * int(max(lengths))
    total = int(sum(lengths))
    if total <= pack_tokens:  # one row holds them all: no layout processes fewer
        return total
    row, offset = pack(list(lengths), pack_tokens)
    return (int(row.max()) + 1) * int(max(offset + np.asarray(lengths)))


class StepSampler:
    """Global batch of optimizer step s = the next G = micro * accum * world examples of a stream of
    seeded permutations (one per epoch), and its plan: the micro-batches of each rank.

    By count (default): micro-batch m of rank r = slice (m * world + r) of the global batch.
    By tokens (`batch_tokens`): the global batch is shared out over the ranks longest first, each to the
    rank with the fewest tokens so far; each rank's share is cut first-fit, longest first, into
    micro-batches of at most `batch_tokens` processed tokens (`processed_tokens`); every rank runs as
    many micro-batches as the rank with the most, an empty one (None) where it has fewer, so that
    ZeRO's collectives stay matched. Either way every rank computes the whole plan, with no communication."""

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int, tokens: np.ndarray | None = None,
                 batch_tokens: int | None = None, pack_tokens: int | None = None):
        if n < micro * accum * world:
            raise ValueError(f"{n} examples cannot fill one global batch of {micro * accum * world} "
                             "(micro_batch_size x grad_accum x world size)")
        self.n, self.micro, self.accum, self.world, self.seed = n, micro, accum, world, seed
        self.tokens, self.batch_tokens, self.pack_tokens = tokens, batch_tokens, pack_tokens

    def _permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:  # drawn once per epoch, not once per micro-batch
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        g = self.micro * self.accum * self.world
        start, out = step * g, []
        while len(out) < g:
            epoch, offset = divmod(start + len(out), self.n)
            out.extend(self._permutation(epoch)[offset: offset + g - len(out)].tolist())
        return np.asarray(out)

    def plan(self, step: int) -> list[list[np.ndarray | None]]:
        """plan[rank][m]: the example indices of micro-batch m of each rank (None: an empty one)."""
        batch = self.global_batch(step)
        if self.batch_tokens is None:
            return [[batch[(m * self.world + r) * self.micro:(m * self.world + r + 1) * self.micro]
                     for m in range(self.accum)] for r in range(self.world)]
        lens = self.tokens[batch].tolist()
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
                            processed_tokens(mb_lens + [lens[i]], self.pack_tokens) <= self.batch_tokens:
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
        sizes = [processed_tokens(self.tokens[mb], self.pack_tokens) for p in plan for mb in p if mb is not None]
        return {"micro_batches": len(plan[0]), "empty_micro_batches": sum(mb is None for p in plan for mb in p),
                "mb_tokens_max": max(sizes), "mb_tokens_mean": float(np.mean(sizes))}


def step_counts(lengths: store.Lengths, indices) -> tuple[int, int]:
    """(response tokens predicted, KL positions) over the examples of a global batch."""
    idx = np.asarray(indices)
    return int((lengths.tokens[idx] - lengths.prompt[idx]).sum()), int(lengths.kl[idx].sum())
