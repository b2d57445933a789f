"""Stage 2's teacher source (docs/design.md, "Stage 2"): chosen once in setup, it yields the examples
and each micro-batch's teacher signal (DistillKit's `SignalSource`: decided once, nothing below
branches on a flag).

- `StoredSignal`: examples and teacher from the store (teacher_mode: offline); the store's signal
  object makes the loss's teacher, whatever the signal;
- `LiveModel`: examples from the data, teacher = the frozen model run beside the student
  (teacher_mode: online; LoRA: the same model with its adapters disabled, the reference method);
- `PlainData`: plain fine-tuning (alpha = 0 throughout, or teacher_mode: none): examples only.
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from .. import store
from ..data import DataError, Examples
from ..loss import LiveTeacher, SampledTeacher, StoredTeacher
from .batches import PADDED, Layout, collate, model_inputs


class ExampleSet(Protocol):
    """Examples by index (a `store.TeacherStore` or `DataExamples`): example(i) -> {example_id, input_ids,
    prompt_len, positions, and a store's signal arrays}; lengths() without reading the examples."""

    def __len__(self) -> int: ...

    def example(self, i: int) -> dict: ...

    def lengths(self) -> store.Lengths: ...

    def follow(self, sampler, rank: int, start: int, stop: int) -> None: ...  # the plan it will be read by (store.RankShards)

    def begin_step(self, step: int) -> None: ...  # the reader is at this optimizer step

    def close(self) -> None: ...


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

    def follow(self, sampler, rank: int, start: int, stop: int) -> None:
        pass

    def begin_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TeacherSource(Protocol):
    """Where the examples and each micro-batch's teacher come from; chosen once, in `train.setup`.
    `batch(rows, pad_id, layout)` is a micro-batch on the host (`batches.to_device` moves it);
    `signal(batch, student)` is the one call between a source and the objective: a source that needs
    the original model's hidden states asks `student.original_hidden(batch)` for them."""
    examples: ExampleSet

    def batch(self, rows: list[dict], pad_id: int, layout: Layout = PADDED) -> dict: ...

    def signal(self, batch: dict, student) -> StoredTeacher | SampledTeacher | LiveTeacher | None: ...


class PlainData:
    """Plain fine-tuning (alpha = 0 throughout): the examples only, no teacher."""

    def __init__(self, examples: ExampleSet):
        self.examples = examples

    def batch(self, rows: list[dict], pad_id: int, layout: Layout = PADDED) -> dict:
        return collate(rows, pad_id, layout)

    def signal(self, batch: dict, student) -> None:
        return None


TEACHER_TOLERANCE = 0.01  # nats per KL position at step 0 (the same model: ~1e-8 with float16 values, ~1e-3 in bf16)


class StoredSignal:
    """The teacher store: each micro-batch carries its rows' stored signal, made into the loss's teacher
    object by the store's signal (`store.signals`: top-k, sampled, ...)."""

    def __init__(self, teacher_store: store.TeacherStore):
        self.examples = teacher_store

    def check_start(self, kl_sum: float, positions: int, option: str) -> None:
        """At the first micro-batch of a fresh run the model is the store's teacher, so its KL over all ranks is
        ~0 (the stored values' rounding); any other model is refused before its first optimizer step. `option`:
        how the caller turns the check off (a recipe key or a keyword)."""
        mean = kl_sum / max(positions, 1)
        if math.isfinite(mean) and mean <= TEACHER_TOLERANCE:
            return
        model = self.examples.manifest["settings"]["model"]
        raise store.StoreError(
            f"the model being trained is not the teacher of store {self.examples.dir}: before any training its KL "
            f"to the stored teacher is {mean:.4g} nats per position (at most {TEACHER_TOLERANCE} for the same model). "
            f"The store was computed with {model.get('name_or_path')} (content hash "
            f"{str(model.get('content_hash'))[:16]}): train that model, precompute a store for this one, or set "
            f"{option} if it starts elsewhere on purpose")

    def batch(self, rows: list[dict], pad_id: int, layout: Layout = PADDED) -> dict:
        batch = collate(rows, pad_id, layout)
        batch["teacher"] = self.examples.signal.teacher(rows)  # on the host, in the stored widths
        return batch

    def signal(self, batch: dict, student):
        return batch["teacher"]


class LiveModel:
    """The frozen teacher run live on each micro-batch (full vocabulary). `frozen`: a frozen copy of the
    original model (full fine-tuning); None: the original model is the student with its LoRA adapters
    disabled (`student.original_hidden`)."""

    def __init__(self, examples: ExampleSet, frozen=None):
        self.examples, self.frozen = examples, frozen

    def batch(self, rows: list[dict], pad_id: int, layout: Layout = PADDED) -> dict:
        return collate(rows, pad_id, layout)

    @torch.no_grad()
    def signal(self, batch: dict, student) -> LiveTeacher:
        if self.frozen is None:
            hidden, weight, bias = student.original_hidden(batch)
        else:
            from ..models import decoder_and_head, head_scale
            body, head = decoder_and_head(self.frozen)
            hidden, weight, bias = (body(**model_inputs(batch)).last_hidden_state * head_scale(self.frozen), head.weight,
                                    head.bias)
        return LiveTeacher(hidden[batch["rows_b"], batch["rows_t"]], weight.detach(),
                           None if bias is None else bias.detach())
