"""Stage 1: run the frozen model once over the training data and store, for every KL position, the
top-k log-probabilities (normalized over the full vocabulary) and the log of the remaining mass.

Work is cut into fixed chunks of `teacher.shard_size` source records, one shard each; chunk j runs
on rank j mod world_size. A shard is written under a temporary name and renamed when whole, with a
sidecar JSON (rows, bytes, sha256, settings digest); a restarted run skips the shards that verify, so
a store can be resumed with any number of ranks and comes out identical.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import dist
from . import teacher_store as ts
from .config import Config, config_digest
from .data import build_examples, read_records
from .models import decoder_and_head, load_model, load_tokenizer, model_fingerprint, resolve_dtype, tokenizer_fingerprint


def kl_positions(mode: str, length: int, prompt_len: int) -> np.ndarray:
    """Positions t whose distribution (over the token after input_ids[:t+1]) enters the KL.
    prompt: [0, P) (the reference masks unshifted labels == -100); response: [P, L); all: [0, L)."""
    lo, hi = {"prompt": (0, prompt_len), "response": (prompt_len, length), "all": (0, length)}[mode]
    return np.arange(lo, hi, dtype=np.int32)


def store_settings(cfg: Config, tok, vocab_size: int, dtype: torch.dtype, data_fp: dict) -> dict:
    """Everything a store depends on; a store is reused or resumed only if this matches exactly."""
    return {
        "model": {**model_fingerprint(cfg.model.name_or_path, cfg.model.revision), "dtype": str(dtype).replace("torch.", ""),
                  "vocab_size": vocab_size},
        "tokenizer": tokenizer_fingerprint(tok),
        "data": data_fp,
        "k": cfg.teacher.k,
        "positions": cfg.teacher.positions,
        "value_dtype": cfg.teacher.value_dtype,
        "id_dtype": ts.id_dtype_for(vocab_size),
        "compression": cfg.teacher.compression,
        "shard_size": cfg.teacher.shard_size,
        "max_seq_len": cfg.data.max_seq_len,
        "long_policy": cfg.data.long_policy,
        "system_prompt": cfg.data.system_prompt,
    }


@torch.inference_mode()
def teacher_topk(body, head, input_ids, attention_mask, rows_b, rows_t, k: int, chunk_rows: int):
    """Top-k log-probs and tail log-mass at the given (batch, position) rows.

    input_ids, attention_mask: (B, T); rows_b, rows_t: (N,). Returns ids (N, K) int64, values (N, K)
    fp32 descending, tail (N,) fp32. The lm_head runs only on the N rows, `chunk_rows` at a time, so
    no (N, V) fp32 tensor is ever whole."""
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    h = hidden[rows_b, rows_t]  # (N, H)
    ids, vals, tails = [], [], []
    for start in range(0, h.shape[0], chunk_rows):
        logp = F.linear(h[start:start + chunk_rows], head.weight, head.bias).float()  # (n, V), one buffer
        logp.sub_(logp.logsumexp(dim=-1, keepdim=True))  # log_softmax over the full vocabulary, in place
        v, i = torch.topk(logp, k, dim=-1)  # (n, K), descending
        # the remaining mass, summed over the tokens outside the top-k in fp32 (no 1 - sum cancellation)
        tail = logp.exp_().scatter_(1, i, 0.0).sum(dim=-1).log()  # (n,)
        ids.append(i), vals.append(v), tails.append(tail)
    if not ids:
        empty = torch.empty(0, k)
        return empty.long(), empty, torch.empty(0)
    return torch.cat(ids), torch.cat(vals), torch.cat(tails)


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


def compute_shard(body, head, examples: list, cfg: Config, pad_id: int, device, k: int) -> ts.ShardRows:
    out = {}
    for batch in length_batches(examples, cfg.teacher.batch_tokens):
        T = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        rows_b, rows_t, pos = [], [], []
        for b, e in enumerate(batch):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[b, : len(e.input_ids)] = 1
            p = kl_positions(cfg.teacher.positions, len(e.input_ids), e.prompt_len)
            pos.append(p)
            rows_b.append(np.full(len(p), b)), rows_t.append(p)
        rb = torch.from_numpy(np.concatenate(rows_b)).to(device)
        rt = torch.from_numpy(np.concatenate(rows_t).astype(np.int64)).to(device)
        top_i, top_v, tail = teacher_topk(body, head, ids.to(device), mask.to(device), rb, rt, k,
                                          cfg.teacher.vocab_chunk_rows)
        top_i, top_v, tail = top_i.cpu().numpy(), top_v.cpu().numpy(), tail.cpu().numpy()
        start = 0
        for e, p in zip(batch, pos):
            n = len(p)
            out[e.example_id] = (p, top_i[start:start + n], top_v[start:start + n], tail[start:start + n])
            start += n
    order = sorted(out)
    by_id = {e.example_id: e for e in examples}
    id_np = np.uint16 if ts.id_dtype_for(head.weight.shape[0]) == "uint16" else np.uint32
    val_np = np.float16 if cfg.teacher.value_dtype == "float16" else np.float32
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
    return ts.ShardRows(
        example_id=np.array(order, dtype=np.int64),
        input_ids=[by_id[i].input_ids for i in order],
        prompt_len=np.array([by_id[i].prompt_len for i in order], dtype=np.int32),
        positions=[out[i][0] for i in order],
        topk_ids=cat([out[i][1] for i in order], (0, k)).astype(id_np),
        topk_logprobs=cat([out[i][2] for i in order], (0, k)).astype(val_np),
        tail_logprob=cat([out[i][3] for i in order], (0,)).astype(np.float32),
    )


def _prepare_dir(out_dir: str, settings: dict, overwrite: bool, rank: int) -> None:
    """Refuse a directory holding a store made from other settings, unless asked to overwrite."""
    path = os.path.join(out_dir, ts.MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = ts.settings_diff(settings, old.get("settings", {}))
        if diff and not overwrite:
            raise ts.StoreError(f"{out_dir} holds a teacher store made from other settings: " + "; ".join(diff)
                                + ". Choose another teacher.output_dir or pass teacher.overwrite=true.")
        if diff and rank == 0:
            shutil.rmtree(os.path.join(out_dir, "shards"), ignore_errors=True)
    elif os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ts.StoreError(f"{out_dir} exists and is not a teacher store; choose an empty teacher.output_dir "
                            "or pass teacher.overwrite=true")


def _sidecar_ok(out_dir: str, j: int, digest: str) -> bool:
    side = os.path.join(out_dir, "shards", ts.shard_name(j).replace(".arrow", ".json"))
    if not os.path.exists(side):
        return False
    with open(side) as f:
        entry = json.load(f)
    return entry.get("settings_digest") == digest and ts.verify_shard(out_dir, entry) is None


def run(cfg: Config) -> dict:
    rank, world = dist.init()
    device = dist.device()
    tc = cfg.teacher
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    records, data_fp = read_records(cfg.data.train, cfg.data)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_model(cfg.model.name_or_path, dtype, cfg.model.revision, cfg.model.attn_implementation)
    model.to(device).eval().requires_grad_(False)
    body, head = decoder_and_head(model)
    vocab = head.weight.shape[0]
    if tc.k > vocab:
        raise ValueError(f"teacher.k={tc.k} is larger than the vocabulary ({vocab})")
    settings = store_settings(cfg, tok, vocab, dtype, data_fp)
    digest = config_digest(settings)
    _prepare_dir(tc.output_dir, settings, tc.overwrite, rank)
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(tc.output_dir, "shards"), exist_ok=True)
        cfg.save(os.path.join(tc.output_dir, "config.yaml"))
        ts.write_json_atomic(os.path.join(tc.output_dir, ts.MANIFEST),
                             {"format": ts.FORMAT, "version": ts.VERSION, "status": "incomplete", "settings": settings})
    dist.barrier()

    n_chunks = (len(records) + tc.shard_size - 1) // tc.shard_size
    mine = [j for j in range(n_chunks) if j % world == rank]
    todo = [j for j in mine if not _sidecar_ok(tc.output_dir, j, digest)]
    skipped_done = len(mine) - len(todo)
    my_records = sum(min(tc.shard_size, len(records) - j * tc.shard_size) for j in todo)
    bar = tqdm(total=my_records, unit="ex", desc=f"precompute (rank 0 of {world})", disable=rank != 0)
    tokens, t0 = 0, time.time()
    for j in todo:
        lo, hi = j * tc.shard_size, min(len(records), (j + 1) * tc.shard_size)
        examples, long_stats = build_examples(records[lo:hi], tok, cfg.data, source=cfg.data.train)
        for e in examples:
            e.example_id += lo
        long_stats.skipped = [i + lo for i in long_stats.skipped]
        long_stats.truncated = [i + lo for i in long_stats.truncated]
        rows = compute_shard(body, head, examples, cfg, tok.pad_token_id, device, tc.k)
        entry = ts.write_shard(os.path.join(tc.output_dir, "shards", ts.shard_name(j)),
                               rows.table(ts.schema(tc.k, settings["id_dtype"], tc.value_dtype)), tc.compression)
        entry.update(chunk=j, first_example_id=lo, records=hi - lo, settings_digest=digest,
                     positions=int(len(rows.tail_logprob)), tokens=int(sum(len(e.input_ids) for e in examples)),
                     tail_mass_sum=float(np.exp(rows.tail_logprob.astype(np.float64)).sum()),
                     long=long_stats.to_dict())
        ts.write_json_atomic(os.path.join(tc.output_dir, "shards", ts.shard_name(j).replace(".arrow", ".json")), entry)
        tokens += entry["tokens"]
        bar.update(hi - lo)
        el = max(time.time() - t0, 1e-9)
        bar.set_postfix(ex_s=f"{bar.n / el:.1f}", tok_s=f"{tokens / el:.0f}")
    bar.close()
    elapsed = time.time() - t0
    dist.barrier()
    summary = None
    if rank == 0:
        summary = _finish(tc.output_dir, n_chunks, settings, cfg, elapsed, skipped_done)
    dist.barrier()
    return summary


def _finish(out_dir: str, n_chunks: int, settings: dict, cfg: Config, elapsed: float, reused: int) -> dict:
    shards = []
    for j in range(n_chunks):
        with open(os.path.join(out_dir, "shards", ts.shard_name(j).replace(".arrow", ".json"))) as f:
            shards.append(json.load(f))
    skipped = [i for s in shards for i in s["long"]["skipped_ids"]]
    truncated = [i for s in shards for i in s["long"]["truncated_ids"]]
    positions = sum(s["positions"] for s in shards)
    nbytes = sum(s["bytes"] for s in shards)
    totals = {
        "examples": sum(s["rows"] for s in shards), "records": sum(s["records"] for s in shards),
        "positions": positions, "tokens": sum(s["tokens"] for s in shards), "bytes": nbytes,
        "bytes_per_position": nbytes / max(positions, 1),
        "bytes_per_entry": nbytes / max(positions * settings["k"], 1),
        "mean_tail_mass": sum(s["tail_mass_sum"] for s in shards) / max(positions, 1),
    }
    long_examples = {"policy": cfg.data.long_policy, "max_seq_len": cfg.data.max_seq_len,
                     "skipped": sum(s["long"]["skipped"] for s in shards),
                     "truncated": sum(s["long"]["truncated"] for s in shards),
                     "skipped_ids": skipped[:1000], "truncated_ids": truncated[:1000]}
    keep = ("file", "rows", "first_example_id", "records", "positions", "tokens", "bytes", "sha256")
    manifest = {"format": ts.FORMAT, "version": ts.VERSION, "status": "complete", "settings": settings,
                "totals": totals, "long_examples": long_examples,
                "shards": [{k: s[k] for k in keep} for s in shards], "config": cfg.to_dict()}
    ts.write_json_atomic(os.path.join(out_dir, ts.MANIFEST), manifest)
    computed = [s for s in shards[reused:]] if reused < len(shards) else []
    summary = {**totals, "long_examples": {k: long_examples[k] for k in ("policy", "skipped", "truncated")},
               "elapsed_s": elapsed, "shards": n_chunks, "shards_reused": reused,
               "examples_per_s": sum(s["rows"] for s in computed) / max(elapsed, 1e-9),
               "tokens_per_s": sum(s["tokens"] for s in computed) / max(elapsed, 1e-9)}
    print(format_summary(out_dir, manifest, summary), flush=True)
    return summary


def format_summary(out_dir: str, manifest: dict, extra: dict | None = None) -> str:
    t, s, lg = manifest["totals"], manifest["settings"], manifest["long_examples"]
    lines = [f"teacher store {out_dir}",
             f"  model {s['model']['name_or_path']} ({s['model']['dtype']}, vocab {s['model']['vocab_size']}), "
             f"k={s['k']}, positions={s['positions']}, values {s['value_dtype']}, ids {s['id_dtype']}, "
             f"compression {s['compression']}",
             f"  examples {t['examples']} of {t['records']} records in {len(manifest['shards'])} shards, "
             f"{t['tokens']} tokens, {t['positions']} stored positions",
             f"  {t['bytes'] / 1e6:.2f} MB, {t['bytes_per_position']:.1f} bytes/position, "
             f"{t['bytes_per_entry']:.2f} bytes per (id, value) entry incl. tail and positions",
             f"  mean tail mass {t['mean_tail_mass']:.4f}",
             f"  long examples (> {lg['max_seq_len']} tokens, policy {lg['policy']}): "
             f"{lg['skipped']} skipped, {lg['truncated']} truncated"]
    if extra and "elapsed_s" in extra:
        el = max(extra["elapsed_s"], 1e-9)
        lines.append(f"  this run: {el:.1f} s, {extra['shards'] - extra['shards_reused']} shards computed, "
                     f"{extra['shards_reused']} reused, {extra['examples_per_s']:.2f} examples/s, "
                     f"{extra['tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
