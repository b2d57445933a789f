"""Stage 2 data (docs/design.md, "Stage 2"): the teacher source, chosen once in setup, that yields the
examples and each micro-batch's teacher signal; a seeded, resumable assignment of examples to
optimizer steps, micro-batches and ranks; and collation, padded or packed (`train.packing`).

Teacher sources (DistillKit's `SignalSource`, decided once, nothing below branches on a flag):
- `StoredTopK`: examples and top-k teacher from the store (teacher_mode: offline);
- `StoredSamples`: examples and sampled teacher from a teacher.signal=sampled store (offline);
- `LiveModel`: examples from the data, teacher = the frozen model run beside the student
  (teacher_mode: online; LoRA: the same model with its adapters disabled, the reference method);
- `NoTeacher`: plain fine-tuning (alpha = 0 throughout): examples only.

Every rank can compute the whole global batch of a step, so the token counts that normalize the
loss (all micro-batches, all ranks) are known before the first forward, with no communication.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import teacher_store as ts
from .data import Examples
from .loss import LiveTeacher, SampledTeacher, StoredTeacher


class DataExamples:
    """Stage 2's view of tokenized data (no store): the kept examples with the positions the rule keeps
    (the same as a store made with it would hold)."""

    def __init__(self, examples: Examples, rule: ts.PositionRule):
        kept, _ = examples.examples()
        if not kept:
            raise ts.StoreError(f"no example is left after data.long_policy={examples.policy} "
                                f"(max_seq_len={examples.max_seq_len}); raise data.max_seq_len")
        self.kept, self.rule = kept, rule

    def __len__(self):
        return len(self.kept)

    def example(self, i: int) -> dict:
        e = self.kept[i]
        return {"example_id": e.example_id, "input_ids": np.asarray(e.input_ids, dtype=np.int64),
                "prompt_len": e.prompt_len, "positions": self.rule.positions(e.example_id, len(e.input_ids),
                                                                             e.prompt_len)}

    def lengths(self) -> ts.Lengths:
        tokens = np.array([len(e.input_ids) for e in self.kept], dtype=np.int64)
        prompt = np.array([e.prompt_len for e in self.kept], dtype=np.int64)
        lo, hi = self.rule.candidates(tokens, prompt)
        return ts.Lengths(tokens, prompt, self.rule.count(hi - lo))


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
             "prompt_lens": torch.tensor([r["prompt_len"] for r in rows], device=device),
             "lengths": torch.tensor(lens, device=device), "tokens": sum(lens), "padded_tokens": n_rows * width}
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


class NoTeacher:
    """Plain fine-tuning: examples only; the KL term is absent."""
    name = "none"

    def __init__(self, examples):
        self.examples = examples

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        return collate(rows, pad_id, device, pack_tokens)

    def signal(self, batch: dict, objective):
        return None


class StoredTopK(NoTeacher):
    """The teacher store: each micro-batch carries its rows' stored top-k and tail."""
    name = "stored top-k"

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        batch = collate(rows, pad_id, device, pack_tokens)
        batch["teacher"] = StoredTeacher(
            torch.as_tensor(np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64), device=device),
            torch.as_tensor(np.concatenate([r["topk_logprobs"] for r in rows]), device=device).float(),
            torch.as_tensor(np.concatenate([r["tail_logprob"] for r in rows]), device=device).float())
        return batch

    def signal(self, batch: dict, objective):
        return batch["teacher"]


class StoredSamples(StoredTopK):
    """The teacher store, signal=sampled: each micro-batch carries its rows' unique sampled ids, their
    weights c/N and exact log-probs, padded to the row with the most ids."""
    name = "stored samples"

    def __init__(self, examples, samples: int):
        super().__init__(examples)
        self.samples = samples

    def batch(self, rows: list[dict], pad_id: int, device, pack_tokens: int | None = None) -> dict:
        batch = collate(rows, pad_id, device, pack_tokens)
        cat = lambda name: np.concatenate([r[name] for r in rows])
        batch["teacher"] = sampled_teacher(cat("sample_len"), cat("sample_ids"), cat("sample_counts"),
                                           cat("sample_logprobs"), self.samples, device)
        return batch


def sampled_teacher(sample_len, ids, counts, logprobs, samples: int, device) -> SampledTeacher:
    """The flat unique ids of the stored positions (sample_len per position) as a SampledTeacher:
    (positions, most unique ids) matrices, weight counts / N, 0 on padding."""
    n_len = np.asarray(sample_len, dtype=np.int64)
    row = np.repeat(np.arange(len(n_len)), n_len)
    col = np.arange(len(row)) - np.repeat(np.cumsum(n_len) - n_len, n_len)
    width = int(n_len.max()) if len(n_len) else 1
    out_ids, weights, logp = (np.zeros((len(n_len), width), dt) for dt in (np.int64, np.float32, np.float32))
    out_ids[row, col], weights[row, col], logp[row, col] = ids, np.asarray(counts) / samples, logprobs
    return SampledTeacher(*(torch.from_numpy(a).to(device) for a in (out_ids, weights, logp)))


class LiveModel(NoTeacher):
    """The frozen teacher run live on each micro-batch (full vocabulary). `frozen`: a frozen copy of
    the original model (full fine-tuning); None: the student with its LoRA adapters disabled."""
    name = "live model"

    def __init__(self, examples, frozen=None):
        super().__init__(examples)
        self.frozen = frozen

    @torch.no_grad()
    def signal(self, batch: dict, objective):
        from .models import decoder_and_head
        if self.frozen is not None:
            body, head = decoder_and_head(self.frozen)
            weight, bias, ctx = head.weight, head.bias, contextlib.nullcontext()
        else:
            body, _ = decoder_and_head(objective.model)
            weight, bias = objective.head()
            ctx = objective.model.disable_adapter()
        with ctx:
            h = body(**model_inputs(batch)).last_hidden_state
        return LiveTeacher(h[batch["rows_b"], batch["rows_t"]], weight.detach(),
                           None if bias is None else bias.detach())


class StepSampler:
    """Global batch of optimizer step s = the next G = micro * accum * world examples of a stream of
    seeded permutations (one per epoch). Micro-batch m of rank r = slice (m * world + r) of it."""

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int):
        if n < micro * accum * world:
            raise ValueError(f"{n} examples cannot fill one global batch of {micro * accum * world} "
                             "(micro_batch_size x grad_accum x world size)")
        self.n, self.micro, self.accum, self.world, self.seed = n, micro, accum, world, seed

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

    def micro_batch(self, step: int, micro: int, rank: int) -> np.ndarray:
        i = (micro * self.world + rank) * self.micro
        return self.global_batch(step)[i: i + self.micro]


def step_counts(lengths: ts.Lengths, indices) -> tuple[int, int]:
    """(response tokens predicted, KL positions) over the examples of a global batch."""
    idx = np.asarray(indices)
    return int((lengths.tokens[idx] - lengths.prompt[idx]).sum()), int(lengths.kl[idx].sum())
