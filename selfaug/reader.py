"""Stage 2 data (docs/design.md, "Stage 2"): the teacher source, chosen once in setup, that yields the
examples and each micro-batch's teacher signal; a seeded, resumable assignment of examples to
optimizer steps, micro-batches and ranks; and collation, padded or packed (`train.packing`).

Teacher sources (`TeacherSource`, DistillKit's `SignalSource`: decided once, nothing below branches on a flag):
- `StoredSignal`: examples and teacher from the store (teacher_mode: offline); the store's signal
  object makes the loss's teacher, whatever the signal;
- `LiveModel`: examples from the data, teacher = the frozen model run beside the student
  (teacher_mode: online; LoRA: the same model with its adapters disabled, the reference method);
- `PlainData`: plain fine-tuning (alpha = 0 throughout, or teacher_mode: none): examples only.

Every rank can compute the whole global batch of a step, so the token counts that normalize the
loss (all micro-batches, all ranks) are known before the first forward, with no communication.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from . import store
from .data import DataError, Examples
from .loss import LiveTeacher, SampledTeacher, StoredTeacher


class ExampleSet(Protocol):
    """Examples by index (a `store.TeacherStore` or `DataExamples`): example(i) -> {example_id, input_ids,
    prompt_len, positions, and a store's signal arrays}; lengths() without reading the examples."""

    def __len__(self) -> int: ...

    def example(self, i: int) -> dict: ...

    def lengths(self) -> store.Lengths: ...


class DataExamples:
    """Stage 2's view of tokenized data (no store): the kept examples with the positions the rule keeps
    (the same as a store made with it would hold)."""

    def __init__(self, examples: Examples, rule: store.PositionRule):
        kept, _ = examples.examples()
        if not kept:
            raise DataError(f"no example is left: {examples.left_out()}; raise data.max_seq_len, or check "
                            "data.format and the records' answers")
        self.kept, self.rule = kept, rule

    def __len__(self):
        return len(self.kept)

    def example(self, i: int) -> dict:
        e = self.kept[i]
        return {"example_id": e.example_id, "input_ids": np.asarray(e.input_ids, dtype=np.int64),
                "prompt_len": e.prompt_len, "positions": self.rule.positions(e.example_id, len(e.input_ids),
                                                                             e.prompt_len)}

    def lengths(self) -> store.Lengths:
        tokens = np.array([len(e.input_ids) for e in self.kept], dtype=np.int64)
        prompt = np.array([e.prompt_len for e in self.kept], dtype=np.int64)
        lo, hi = self.rule.candidates(tokens, prompt)
        return store.Lengths(tokens, prompt, self.rule.count(hi - lo))


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


class TeacherSource(Protocol):
    """Where the examples and each micro-batch's teacher come from; chosen once, in `train.setup`.
    `signal(batch, student)` is the one call between a source and the objective: a source that needs
    the original model's hidden states asks `student.original_hidden(batch)` for them."""
    examples: ExampleSet

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict: ...

    def signal(self, batch: dict, student) -> StoredTeacher | SampledTeacher | LiveTeacher | None: ...


class PlainData:
    """Plain fine-tuning (alpha = 0 throughout): the examples only, no teacher."""

    def __init__(self, examples: ExampleSet):
        self.examples = examples

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        return collate(rows, pad_id, device, pack_tokens)

    def signal(self, batch: dict, student) -> None:
        return None


class StoredSignal:
    """The teacher store: each micro-batch carries its rows' stored signal, made into the loss's teacher
    object by the store's signal (`store.signals`: top-k, sampled, ...)."""

    def __init__(self, teacher_store: store.TeacherStore):
        self.examples = teacher_store

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        batch = collate(rows, pad_id, device, pack_tokens)
        batch["teacher"] = self.examples.signal.teacher(rows, device)
        return batch

    def signal(self, batch: dict, student):
        return batch["teacher"]


class LiveModel:
    """The frozen teacher run live on each micro-batch (full vocabulary). `frozen`: a frozen copy of the
    original model (full fine-tuning); None: the original model is the student with its LoRA adapters
    disabled (`student.original_hidden`)."""

    def __init__(self, examples: ExampleSet, frozen=None):
        self.examples, self.frozen = examples, frozen

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        return collate(rows, pad_id, device, pack_tokens)

    @torch.no_grad()
    def signal(self, batch: dict, student) -> LiveTeacher:
        if self.frozen is None:
            hidden, weight, bias = student.original_hidden(batch)
        else:
            from .models import decoder_and_head
            body, head = decoder_and_head(self.frozen)
            hidden, weight, bias = body(**model_inputs(batch)).last_hidden_state, head.weight, head.bias
        return LiveTeacher(hidden[batch["rows_b"], batch["rows_t"]], weight.detach(),
                           None if bias is None else bias.detach())


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
