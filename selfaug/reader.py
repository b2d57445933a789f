"""Stage 2 data (docs/design.md, "Stage 2"): the teacher source, chosen once in setup, that yields the
examples and each micro-batch's teacher signal; a seeded, resumable assignment of examples to
optimizer steps, micro-batches and ranks; and collation.

Teacher sources (DistillKit's `SignalSource`, decided once, nothing below branches on a flag):
- `StoredTopK`: examples and top-k teacher from the store (teacher_mode: offline);
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
from .data import Examples, pad
from .loss import LiveTeacher, StoredTeacher


class DataExamples:
    """Stage 2's view of tokenized data (no store): the kept examples with their KL positions."""

    def __init__(self, examples: Examples, positions_mode: str):
        kept, _ = examples.examples()
        if not kept:
            raise ts.StoreError(f"no example is left after data.long_policy={examples.policy} "
                                f"(max_seq_len={examples.max_seq_len}); raise data.max_seq_len")
        self.kept, self.mode = kept, positions_mode

    def __len__(self):
        return len(self.kept)

    def example(self, i: int) -> dict:
        e = self.kept[i]
        return {"example_id": e.example_id, "input_ids": np.asarray(e.input_ids, dtype=np.int64),
                "prompt_len": e.prompt_len, "positions": ts.kl_positions(self.mode, len(e.input_ids), e.prompt_len)}

    def lengths(self) -> ts.Lengths:
        tokens = np.array([len(e.input_ids) for e in self.kept], dtype=np.int64)
        prompt = np.array([e.prompt_len for e in self.kept], dtype=np.int64)
        kl = np.array([len(ts.kl_positions(self.mode, t, p)) for t, p in zip(tokens, prompt)], dtype=np.int64)
        return ts.Lengths(tokens, prompt, kl)


def collate(rows: list[dict], pad_id: int, device) -> dict:
    """Right-padded tensors for a micro-batch; KL rows flattened in example order."""
    input_ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    rows_b = np.concatenate([np.full(len(r["positions"]), b) for b, r in enumerate(rows)])
    rows_t = np.concatenate([np.asarray(r["positions"], dtype=np.int64) for r in rows])
    return {
        "input_ids": input_ids.to(device), "attention_mask": mask.to(device),
        "prompt_lens": torch.tensor([r["prompt_len"] for r in rows], device=device),
        "lengths": torch.tensor([len(r["input_ids"]) for r in rows], device=device),
        "rows_b": torch.as_tensor(rows_b, dtype=torch.long, device=device),
        "rows_t": torch.as_tensor(rows_t, dtype=torch.long, device=device),
    }


class NoTeacher:
    """Plain fine-tuning: examples only; the KL term is absent."""
    name = "none"

    def __init__(self, examples):
        self.examples = examples

    def batch(self, rows: list[dict], pad_id: int, device) -> dict:
        return collate(rows, pad_id, device)

    def signal(self, batch: dict, objective):
        return None


class StoredTopK(NoTeacher):
    """The teacher store: each micro-batch carries its rows' stored top-k and tail."""
    name = "stored top-k"

    def batch(self, rows: list[dict], pad_id: int, device) -> dict:
        batch = collate(rows, pad_id, device)
        batch["teacher"] = StoredTeacher(
            torch.as_tensor(np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64), device=device),
            torch.as_tensor(np.concatenate([r["topk_logprobs"] for r in rows]), device=device).float(),
            torch.as_tensor(np.concatenate([r["tail_logprob"] for r in rows]), device=device).float())
        return batch

    def signal(self, batch: dict, objective):
        return batch["teacher"]


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
            h = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
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
