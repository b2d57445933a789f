"""The held-out loss during training (docs/design.md, "Stage 2"): every train.eval_steps optimizer steps, and at
the last, the NLL of data.eval's examples under the model being trained, logged by rank 0 as an `eval_nll` row of
metrics.jsonl (and to train.report_to's loggers). Each rank computes its share of the examples without gradient;
the sums are all-reduced once. Every rank runs the same number of forwards (ZeRO-3 gathers in each): one whose
share is shorter reruns an example with weight 0, as the training steps do.

The KL is not computed here: a teacher store holds data.train's examples only, never data.eval's.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import BUILTIN_RAG, BUILTIN_RAG_EVAL, DataError, load_examples
from ..errors import SelfAugError
from .batches import collate, to_device


class EvalDataError(SelfAugError, ValueError):
    """train.eval_steps without held-out data to compute it on."""


def eval_source(cfg) -> str:
    """data.eval, or builtin:rag-eval beside builtin:rag (as `selfaug eval` reads it); one line when there is none."""
    source = cfg.data.eval or (BUILTIN_RAG_EVAL if cfg.data.train == BUILTIN_RAG else None)
    if source is None:
        raise EvalDataError(f"train.eval_steps={cfg.train.eval_steps} computes the NLL on held-out data, and data.eval "
                            "is not set: set data.eval (a file or dataset of the training data's format), or "
                            "train.eval_steps=0")
    return source


class HeldOut:
    """data.eval's kept examples, this rank's share (every world-th), in padded micro-batches (any attention, no
    packing) of train.micro_batch_size examples, or of at most train.micro_batch_tokens padded tokens when set."""

    def __init__(self, cfg, tok, rank: int, world: int):
        source = eval_source(cfg)
        kept, _ = load_examples(source, tok, cfg.data).examples()
        if not kept:
            raise DataError(f"data.eval {source}: no example is left to compute train.eval_steps' NLL on; raise "
                            "data.max_seq_len, or check the records' answers")
        plans = [self._plan(kept[r::world], cfg.train) for r in range(world)]  # every rank's, known to every rank
        self.mine, self.forwards = plans[rank], max(len(p) for p in plans)  # the same forward count on every rank
        self.pad_id, self.examples = tok.pad_token_id, len(kept)

    @staticmethod
    def _plan(share: list, tc) -> list[list]:
        """`share` cut in order into micro-batches: micro_batch_size examples, or as many as fit micro_batch_tokens
        padded (an example longer than the budget alone)."""
        plan = []
        for e in share:
            if plan:
                n, width = len(plan[-1]) + 1, max(len(x.input_ids) for x in plan[-1] + [e])
                if (n * width <= tc.micro_batch_tokens) if tc.micro_batch_tokens else (n <= tc.micro_batch_size):
                    plan[-1].append(e)
                    continue
            plan.append([e])
        return plan

    def micro_batches(self):
        """[(rows, weight)]: this rank's share, then an example with weight 0 until every rank's forward count."""
        for m in range(self.forwards):
            rows = self.mine[m] if m < len(self.mine) else None
            yield ([self._row(e) for e in rows], 1.0) if rows else ([self._row(self.mine[0][0])], 0.0)

    @staticmethod
    def _row(e) -> dict:
        return {"input_ids": np.asarray(e.input_ids, dtype=np.int64), "prompt_len": e.prompt_len,
                "positions": np.zeros(0, dtype=np.int64)}  # no KL rows: the NLL alone


@torch.no_grad()
def eval_nll(run, held: HeldOut) -> dict:
    """All ranks: {eval_nll, eval_tokens}: the mean NLL per response token of data.eval's examples, over all ranks."""
    engine = run.engine
    engine.module.eval()  # no dropout (lora_dropout)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # nll sum, response tokens
    try:
        for rows, weight in held.micro_batches():
            batch = to_device(collate(rows, held.pad_id), run.device)  # padded rows
            _, nll, _ = engine(batch, 1.0, 0.0, False)
            sums += weight * torch.stack([nll.double(), (batch["labels"] != -100).sum().double()])
    finally:
        engine.module.train()
    if run.world > 1:
        torch.distributed.all_reduce(sums)
    nll, tokens = sums.tolist()
    return {"eval_nll": nll / max(tokens, 1), "eval_tokens": int(tokens)}
