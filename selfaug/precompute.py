"""Stage 1 (docs/design.md, "Stage 1"): run the frozen model once over the training data and compute,
at every KL position the position rule keeps (`teacher_store.PositionRule`), the teacher's signal:
`topk`: the top-k log-probabilities (normalized over the full vocabulary) and the log of the
remaining mass; `sampled`: N draws from the full distribution (seeded per example), as unique ids
with counts and exact log-probs. This module only computes rows; `teacher_store.StoreWriter` stores
them.

Work is cut into fixed chunks of `teacher.shard_size` source records, one shard each; chunk j runs
on rank j mod world_size, so a store can be resumed with any number of ranks and comes out identical.

The teacher is either whole on every rank (`teacher.deepspeed: null`) or partitioned over all ranks
with ZeRO-3 (`teacher.deepspeed: ds_configs/zero3_inference.json`): parameters are gathered layer by
layer in each forward, so the ranks step in lockstep, and a rank with no work left runs a dummy batch
so that every rank issues the same collectives.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import dist
from . import teacher_store as ts
from .config import Config, check_paths
from .data import pad
from .models import decoder_and_head, load_all, partition_line, vocab_size


def topk_signal(k: int):
    """Per chunk of full-vocabulary log-probs: the top-k ids and log-probs (descending) and the log of
    the remaining mass, summed over the tokens outside the top-k in fp32 (no 1 - sum cancellation)."""
    def fn(logp, rows):
        v, i = torch.topk(logp, k, dim=-1)  # (n, K)
        tail = logp.exp_().scatter_(1, i, 0.0).sum(dim=-1).log()  # (n,); logp is the chunk's own buffer
        return {"topk_ids": i, "topk_logprobs": v, "tail_logprob": tail}
    return fn


def sampled_signal(uniforms: torch.Tensor):
    """Per chunk: N draws per row from the full distribution by inverting its CDF at the given uniforms
    (rows, N) in [0, 1), and their exact log-probs; the draws sorted per row (deduplicated later)."""
    def fn(logp, rows):
        cdf = logp.exp().cumsum_(-1)  # (n, V) fp32
        u = uniforms[rows].to(cdf) * cdf[:, -1:]  # scaled by the total, which rounding leaves near 1
        ids = torch.searchsorted(cdf, u, right=True).clamp_(max=logp.shape[1] - 1)  # (n, N)
        ids = ids.sort(dim=-1).values
        return {"sample_ids": ids, "sample_logprobs": logp.gather(1, ids)}
    return fn


@torch.no_grad()
def teacher_signal(body, head, input_ids, attention_mask, rows_b, rows_t, signal_fn, chunk_rows: int,
                   partitioned: bool = False) -> dict:
    """The teacher's signal at the given (batch, position) rows.

    Args:
        input_ids, attention_mask: (B, T).
        rows_b, rows_t: (N,) the rows' batch index and position.
        signal_fn(logp (n, V) fp32 log-probs of a chunk, rows slice) -> {name: (n, ...) tensor}.
        partitioned: the head is ZeRO-3 partitioned: gather it once for this batch (a collective).
    Returns {name: (N, ...) tensor} on the CPU. The lm_head runs only on the N rows, `chunk_rows` at a
    time, so no (N, V) fp32 tensor is ever whole."""
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    h = hidden[rows_b, rows_t]  # (N, H)
    parts = []
    params = [p for p in (head.weight, head.bias) if p is not None]
    if partitioned:
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(params)
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        for start in range(0, max(h.shape[0], 1), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp = F.linear(h[rows], head.weight, head.bias).float()  # (n, V), one buffer
            logp.sub_(logp.logsumexp(dim=-1, keepdim=True))  # log_softmax over the full vocabulary, in place
            parts.append(signal_fn(logp, rows))
    return {name: torch.cat([p[name] for p in parts]).cpu() for name in parts[0]}


def dedupe_samples(ids: np.ndarray, logprobs: np.ndarray) -> dict:
    """Sorted draws (n, N) per row -> unique ids with counts, flat, and the number per row."""
    n, N = ids.shape
    new = np.ones((n, N), dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.append(starts, n * N))
    return {"sample_len": new.sum(axis=1), "sample_ids": ids.ravel()[starts], "sample_counts": counts,
            "sample_logprobs": logprobs.ravel()[starts]}


def length_batches(examples: list, batch_tokens: int) -> list[list]:
    """Longest first, as many per batch as fit in batch_tokens padded tokens (at least one)."""
    order = sorted(examples, key=lambda e: -len(e.input_ids))
    batches, cur = [], []
    for ex in order:
        longest = len(cur[0].input_ids) if cur else len(ex.input_ids)
        if cur and (len(cur) + 1) * longest > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(ex)
    if cur:
        batches.append(cur)
    return batches


class Teacher:
    """The frozen model of stage 1, whole on this rank or ZeRO-3 partitioned over all ranks."""

    def __init__(self, model, cfg: Config, pad_id: int, device, partitioned: bool):
        self.body, self.head = decoder_and_head(model)
        self.cfg, self.pad_id, self.device, self.partitioned = cfg, pad_id, device, partitioned
        self.vocab = vocab_size(model)
        self.rule = ts.PositionRule.of(cfg.teacher)

    def batch(self, batch: list) -> dict:
        """example_id -> (positions, {column: array}) for one length bucket (`ShardRows.signal`'s columns)."""
        tc = self.cfg.teacher
        ids, mask = pad([e.input_ids for e in batch], self.pad_id)
        pos = [self.rule.positions(e.example_id, len(e.input_ids), e.prompt_len) for e in batch]
        rb = torch.from_numpy(np.concatenate([np.full(len(p), b) for b, p in enumerate(pos)])).to(self.device)
        rt = torch.from_numpy(np.concatenate(pos).astype(np.int64)).to(self.device)
        if tc.signal == "topk":
            fn = topk_signal(tc.k)
        else:
            u = np.concatenate([ts.sample_uniforms(tc.seed, e.example_id, len(p), tc.samples)
                                for e, p in zip(batch, pos)])
            fn = sampled_signal(torch.from_numpy(u).to(self.device))
        got = {k: v.numpy() for k, v in teacher_signal(self.body, self.head, ids.to(self.device),
                                                       mask.to(self.device), rb, rt, fn, tc.vocab_chunk_rows,
                                                       self.partitioned).items()}
        out, start = {}, 0
        for e, p in zip(batch, pos):
            part = {k: v[start:start + len(p)] for k, v in got.items()}
            if tc.signal == "sampled":
                part = dedupe_samples(part["sample_ids"], part["sample_logprobs"])
            out[e.example_id] = (p, part)
            start += len(p)
        return out

    def dummy(self) -> None:
        """The collectives of one batch with no data (partitioned teacher, a rank with no work left)."""
        one = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        teacher_signal(self.body, self.head, one, torch.ones_like(one), one[0] * 0, one[0] * 0, topk_signal(1),
                       self.cfg.teacher.vocab_chunk_rows, self.partitioned)


def shard_rows(examples: list, out: dict, vocab: int, tc) -> ts.ShardRows:
    """The computed rows of one chunk, in example order, as the store's arrays (tc: the TeacherConfig)."""
    value_dtype = tc.value_dtype
    order = sorted(out)
    by_id = {e.example_id: e for e in examples}
    id_np = np.uint16 if ts.id_dtype_for(vocab) == "uint16" else np.uint32
    dtypes = {"topk_ids": id_np, "sample_ids": id_np, "sample_counts": np.uint16, "sample_len": np.int64,
              "tail_logprob": np.float32, "topk_logprobs": value_dtype, "sample_logprobs": value_dtype}
    empty = ({"topk_ids": np.zeros((0, tc.k)), "topk_logprobs": np.zeros((0, tc.k)), "tail_logprob": np.zeros(0)}
             if tc.signal == "topk" else {name: np.zeros(0) for name in ("sample_len", *ts.SAMPLED_COLUMNS)})
    signal = {name: np.concatenate([out[i][1][name] for i in order] or [zero]).astype(dtypes[name])
              for name, zero in empty.items()}
    return ts.ShardRows(
        example_id=np.array(order, dtype=np.int64),
        input_ids=[by_id[i].input_ids for i in order],
        prompt_len=np.array([by_id[i].prompt_len for i in order], dtype=np.int32),
        positions=[out[i][0] for i in order],
        signal=signal,
    )


def compute_shard(teacher: Teacher, examples: list) -> ts.ShardRows:
    out = {}
    for batch in length_batches(examples, teacher.cfg.teacher.batch_tokens):
        out.update(teacher.batch(batch))
    return shard_rows(examples, out, teacher.vocab, teacher.cfg.teacher)


def teacher_ds_config(cfg: Config, device) -> dict | None:
    """The filled ZeRO-3 inference config of `teacher.deepspeed`, or None (a whole teacher per rank)."""
    if cfg.teacher.deepspeed is None:
        return None
    from .models import resolve_dtype
    conf = dist.deepspeed_config(cfg.teacher.deepspeed, {
        "bf16.enabled": device.type == "cuda" and resolve_dtype(cfg.model.dtype, "cuda") == torch.bfloat16,
        "fp16.enabled": False, "train_micro_batch_size_per_gpu": 1})
    if conf.get("zero_optimization", {}).get("stage") != 3:
        raise dist.DistError(f"teacher.deepspeed={cfg.teacher.deepspeed}: a partitioned teacher needs ZeRO stage 3 "
                             "(zero_optimization.stage = 3), e.g. ds_configs/zero3_inference.json")
    return conf


def run(cfg: Config) -> dict | None:
    check_paths(cfg)
    rank, world = dist.init()
    device = dist.device()
    tc = cfg.teacher
    ds_conf = teacher_ds_config(cfg, device)
    if ds_conf is not None:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        ds_conf["train_batch_size"] = world
    loaded = load_all(cfg, device, ds_config=ds_conf)  # created partitioned under ZeRO-3
    model = loaded.model
    line = partition_line(model, rank)
    if line:
        print(line, flush=True)
    if ds_conf is not None:
        model = deepspeed.initialize(model=model, config=ds_conf)[0].module  # ZeRO-Inference: no optimizer
    else:
        model.to(device)
    model.eval().requires_grad_(False)
    teacher = Teacher(model, cfg, loaded.tok.pad_token_id, device, partitioned=ds_conf is not None)
    if tc.signal == "topk" and tc.k > teacher.vocab:
        raise ts.StoreError(f"teacher.k={tc.k} is larger than the vocabulary ({teacher.vocab})")
    settings = ts.store_settings(cfg, loaded.tok, teacher.vocab, loaded.dtype, loaded.examples.fingerprint)
    how = {"teacher": "zero3-partitioned" if ds_conf is not None else "whole", "world_size": world,
           "deepspeed": tc.deepspeed}
    with ts.StoreWriter(tc.output_dir, cfg, settings, how, rank, world) as writer:
        return _compute(writer, teacher, loaded.examples, cfg, rank, world)


def _compute(writer: ts.StoreWriter, teacher: Teacher, data, cfg: Config, rank: int, world: int) -> dict | None:
    """Every chunk this rank still has to compute, handed to the writer; the summary (rank 0)."""
    tc = cfg.teacher
    n_records = len(data)
    todo = writer.open((n_records + tc.shard_size - 1) // tc.shard_size)
    # a partitioned teacher steps in lockstep: as many rounds as the busiest rank has chunks
    rounds = int(dist.all_reduce_max(len(todo))) if teacher.partitioned else len(todo)
    records = sum(min(tc.shard_size, n_records - j * tc.shard_size) for j in todo)
    t0 = time.time()
    # closed on the way out, also by an error, so that the error starts on a line of its own
    with tqdm(total=records, unit="ex", desc=f"precompute (rank 0 of {world})", disable=rank != 0) as bar:
        for r in range(rounds):
            j = todo[r] if r < len(todo) else None
            lo, hi = (j * tc.shard_size, min(n_records, (j + 1) * tc.shard_size)) if j is not None else (0, 0)
            examples, long_stats = data.examples(lo, hi) if j is not None else ([], None)
            batches = length_batches(examples, tc.batch_tokens)
            n = int(dist.all_reduce_max(len(batches))) if teacher.partitioned else len(batches)
            out = {}
            for b in range(n):
                if b < len(batches):
                    out.update(teacher.batch(batches[b]))
                else:
                    teacher.dummy()
            if j is None:
                continue
            rows = shard_rows(examples, out, teacher.vocab, tc)
            entry = writer.write(j, rows, lo, hi - lo, long_stats.to_dict())
            bar.update(hi - lo)
            el = max(time.time() - t0, 1e-9)
            bar.set_postfix(ex_s=f"{bar.n / el:.1f}", tok_s=f"{writer.computed[2] / el:.0f}", shard=entry["file"])
    return writer.close(time.time() - t0)
