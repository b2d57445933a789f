"""The examples a Hugging Face trainer reads (docs/design.md, "In your own trainer"): the store's own
examples as a `datasets.Dataset` of row numbers, a user's tokenized dataset matched to the store, the
seeded order of `selfaug train`, and the collator that carries each example's teacher rows to the loss.

The dataset holds only `selfaug_row` (the example's row in the store) and `length` (its tokens), so
no trainer setting can drop or misalign the teacher: the collator reads each row's tokens, prompt
length, KL positions and stored signal from the store itself (`StoredSignal.batch`, the collation of
`selfaug train`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import DataError
from ..train.batches import PADDED, Layout, StepSampler
from ..train.sources import StoredSignal

ROW = "selfaug_row"
LENGTH = "length"


def store_dataset(teacher_store, rows=None):
    """A `datasets.Dataset` of the store's examples (all of them, or `rows`, in that order): columns
    `selfaug_row` and `length`."""
    import datasets
    tokens = teacher_store.lengths().tokens
    rows = np.arange(len(teacher_store)) if rows is None else np.asarray(rows, dtype=np.int64)
    return datasets.Dataset.from_dict({ROW: rows, LENGTH: tokens[rows]})


def match_dataset(dataset, teacher_store):
    """The store's rows of a user's tokenized dataset, which must be the data the store was made from:
    each record needs `input_ids`; with an `example_id` column it is matched by id (a subset, in any
    order), else record i is the store's example i. Any record whose tokens differ is a DataError naming
    the first one, and where its tokens part."""
    if ROW in getattr(dataset, "column_names", []):
        return dataset  # already the store's (store_dataset)
    names = getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset) else [])
    if "input_ids" not in names:
        raise DataError(f"train_dataset has no input_ids column (columns: {names}): pass the tokenized records "
                        "the store was computed on, or leave train_dataset out to train on the store's own examples")
    by_id = {int(teacher_store.example(i)["example_id"]): i for i in range(len(teacher_store))} \
        if "example_id" in names else None
    rows = []
    for j in range(len(dataset)):
        record = dataset[j]
        if by_id is None:
            if j >= len(teacher_store):
                raise DataError(f"train_dataset record {j}: the store holds only {len(teacher_store)} examples; "
                                "this dataset is not the one the store was made from")
            row, what = j, f"record {j}"
        else:
            eid = int(record["example_id"])
            if eid not in by_id:
                raise DataError(f"train_dataset record {j}: example_id {eid} is not in the store (kept examples: "
                                f"{len(by_id)}); this dataset is not the one the store was made from")
            row, what = by_id[eid], f"record {j} (example_id {eid})"
        mine, theirs = np.asarray(record["input_ids"]), teacher_store.example(row)["input_ids"]
        if len(mine) != len(theirs) or not np.array_equal(mine, theirs):
            where = next((t for t in range(min(len(mine), len(theirs))) if mine[t] != theirs[t]),
                         min(len(mine), len(theirs)))
            raise DataError(f"train_dataset {what} is not the store's example: its input_ids ({len(mine)} tokens) "
                            f"differ from the store's ({len(theirs)} tokens) from token {where} on. Train on the "
                            "records the store was computed on (leave train_dataset out to use the store's own), "
                            "or precompute a store for this data")
        rows.append(row)
    if not rows:
        raise DataError("train_dataset holds no records")
    return store_dataset(teacher_store, rows)


class StepOrder(torch.utils.data.Sampler):
    """The examples of `selfaug train`'s steps in order: step s's global batch (`StepSampler`), laid out
    so that accelerate's sharding (batch k of size micro to process k mod world) gives rank r the
    micro-batches (m * world + r), exactly as `selfaug train` does."""

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int, steps: int):
        self.sampler, self.steps = StepSampler(n, micro, accum, world, seed), steps

    def __len__(self) -> int:
        return self.steps * self.sampler.micro * self.sampler.accum * self.sampler.world

    def __iter__(self):
        for step in range(self.steps):
            yield from self.sampler.global_batch(step).tolist()


class SelfAugCollator:
    """features (rows of `store_dataset`) -> the collated micro-batch of `selfaug train` in its layout
    (`batches.layout_for`: padded, packed rows under a mask, or one varlen row under flash-attention):
    input_ids, labels (B, T) already shifted, the layout's inputs, the KL rows rows_b and rows_t (N,), and
    `teacher`, the loss's teacher object for those N rows (on the CPU; moved with the batch)."""

    def __init__(self, teacher_store, pad_id: int, layout: Layout = PADDED):
        self.source, self.pad_id, self.layout = StoredSignal(teacher_store), pad_id, layout

    def __call__(self, features: list[dict]) -> dict:
        rows = [self.source.examples.example(int(f[ROW])) for f in features]
        return self.source.batch(rows, self.pad_id, self.layout)
