"""Stage 2 data: examples from the teacher store (offline) or from the data (online), a seeded,
resumable assignment of examples to optimizer steps, micro-batches and ranks, and collation.

Every rank can compute the whole global batch of a step, so the token counts that normalize the
loss (all micro-batches, all ranks) are known before the first forward, with no communication.
"""
from __future__ import annotations

import numpy as np
import torch

from . import teacher_store as ts
from .precompute import kl_positions

# the store settings that must match the recipe for the stored teacher to be the right one
MATCHED = ("model.name_or_path", "model.content_hash", "model.vocab_size", "tokenizer.vocab_sha256",
           "tokenizer.chat_template_sha256", "data.source", "data.sha256", "data.records", "k", "positions",
           "max_seq_len", "long_policy", "system_prompt")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_store(store_dir: str, manifest: dict, expected: dict) -> None:
    """Refuse a store made for another model, tokenizer, data or k, naming each differing field."""
    found = manifest["settings"]
    diff = [f"{key} (store: {_get(found, key)!r}, recipe: {_get(expected, key)!r})"
            for key in MATCHED if _get(found, key) != _get(expected, key)]
    if diff:
        raise ts.StoreError(f"teacher store {store_dir} does not match this recipe: " + "; ".join(diff)
                            + ". Re-run `selfaug precompute` with this recipe, or point teacher.output_dir "
                              "at the store made for it.")


class OnlineExamples:
    """Tokenized examples with their KL positions, for the online teacher (no store)."""

    def __init__(self, examples, positions_mode: str):
        self.examples, self.mode = examples, positions_mode

    def __len__(self):
        return len(self.examples)

    def example(self, i: int) -> dict:
        e = self.examples[i]
        return {"example_id": e.example_id, "input_ids": np.asarray(e.input_ids, dtype=np.int64),
                "prompt_len": e.prompt_len, "positions": kl_positions(self.mode, len(e.input_ids), e.prompt_len)}

    def lengths(self):
        return [(len(e.input_ids), e.prompt_len, len(kl_positions(self.mode, len(e.input_ids), e.prompt_len)))
                for e in self.examples]


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


def step_counts(lengths, indices) -> tuple[int, int]:
    """(response tokens predicted, KL positions) over the examples of a global batch."""
    nll = sum(lengths[i][0] - lengths[i][1] for i in indices)
    kl = sum(lengths[i][2] for i in indices)
    return nll, kl


def collate(rows: list[dict], pad_id: int, device, with_teacher: bool) -> dict:
    """Right-padded tensors for a micro-batch; KL rows flattened in example order."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r["input_ids"])] = torch.as_tensor(np.asarray(r["input_ids"], dtype=np.int64))
        mask[b, : len(r["input_ids"])] = 1
    rows_b = np.concatenate([np.full(len(r["positions"]), b) for b, r in enumerate(rows)])
    rows_t = np.concatenate([np.asarray(r["positions"], dtype=np.int64) for r in rows])
    batch = {
        "input_ids": input_ids.to(device), "attention_mask": mask.to(device),
        "prompt_lens": torch.tensor([r["prompt_len"] for r in rows], device=device),
        "lengths": torch.tensor([len(r["input_ids"]) for r in rows], device=device),
        "rows_b": torch.as_tensor(rows_b, dtype=torch.long, device=device),
        "rows_t": torch.as_tensor(rows_t, dtype=torch.long, device=device),
    }
    if with_teacher:
        batch["topk_ids"] = torch.as_tensor(np.concatenate([r["topk_ids"] for r in rows]).astype(np.int64), device=device)
        batch["topk_logprobs"] = torch.as_tensor(np.concatenate([r["topk_logprobs"] for r in rows]),
                                                 device=device).float()
        batch["tail_logprob"] = torch.as_tensor(np.concatenate([r["tail_logprob"] for r in rows]), device=device).float()
    return batch
