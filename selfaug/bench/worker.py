"""The measurements behind `selfaug bench` (docs/design.md, "Benchmarks"). bench.py drives; this
module never imports it. Where peak memory is measured, bench.py runs these in a fresh process:
python -m selfaug.bench.worker {step|long|scale|data|budget} ARGS, which prints one JSON line (`main`;
`--smoke` calls it in the bench's own process)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..config import Config, load_config
from ..loss import StoredTeacher, kl_sum


def peak_rss_reset() -> None:
    """Make the kernel's peak-RSS counter (VmHWM) start again from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device) -> int:
    """Peak device memory (CUDA) or the process's peak resident memory (CPU) since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS, VmRSS: current)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_rss_reset()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(variant: str, cfg_path: str, steps: int, overrides: list[str]) -> dict:
    from .. import train as tr
    # SelfAug variants run at the recipe's alpha, or 0.5 where the recipe has none: passed as an override,
    # never written into a loaded config
    alpha = load_config(cfg_path, [o for o in overrides if not o.startswith("train.teacher_mode=")]).train.alpha or 0.5
    extra = {"vanilla_lora": ["train.alpha=0"], "offline": ["train.teacher_mode=offline", f"train.alpha={alpha}"],
             "online": ["train.teacher_mode=online", f"train.alpha={alpha}"], "alpha0": ["train.alpha=0"]}[variant]
    # a run directory of its own: the recipe's may hold a run (train.resume=never over it is refused)
    scratch = f"train.output_dir={tempfile.mkdtemp(prefix='selfaug-bench-step-')}"
    cfg = load_config(cfg_path, list(overrides) + extra + ["train.resume=never", scratch])

    class HFLoss(tr.Objective):
        """Vanilla LoRA as commonly run: full logits at every position, mean cross-entropy."""

        def forward(self, batch, c_nll, c_kl, with_kl=True):
            from ..train.batches import model_inputs
            logits = self.model(**model_inputs(batch)).logits
            labels = batch["labels"]
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
            return c_nll * nll, nll.detach(), torch.zeros(())

    run = tr.setup(cfg, HFLoss if variant == "vanilla_lora" else None)
    device = run.device
    times, tokens, processed = [], 0, 0
    for s in range(steps + 1):
        if s == 1:
            reset_peak(device)  # the first step (allocator warm-up, lazy inits) is not measured
        sync(device)
        t0 = time.perf_counter()
        got = tr.train_step(run, s, tr.step_coefficients(run, s))
        sync(device)
        if s >= 1:
            times.append(time.perf_counter() - t0)
            tokens, processed = tokens + got.tokens, processed + got.processed
    return {"variant": variant, "step_time_s": float(np.median(times)), "tokens_per_s": tokens / sum(times),
            "peak_bytes": peak_bytes(device), "steps": steps, "alpha": cfg.train.alpha,
            "padding": 1 - tokens / max(processed, 1), "kl_positions": int(tr.step_coefficients(run, 1).n_kl)}


def long(T: int, V: int, H: int, K: int, rows_per_chunk: int) -> dict:
    """Peak memory of the KL and its backward over T prompt positions, above what the inputs hold."""
    device = dist.device()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, T, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device)
    logp = torch.log_softmax(torch.randn(T, K, generator=g), -1) - 1.0
    teacher = StoredTeacher(torch.randint(0, V, (T, K), generator=g).to(device), logp.to(device),
                            torch.full((T,), -0.5).to(device))
    rows_b, rows_t = torch.zeros(T, dtype=torch.long, device=device), torch.arange(T, device=device)
    reset_peak(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_bytes(device)
    t0 = time.perf_counter()
    s, _ = kl_sum(hidden, weight, None, rows_b, rows_t, teacher, chunk_rows=rows_per_chunk)
    s.backward()
    sync(device)
    return {"tokens": T, "loss_peak_bytes": peak_bytes(device) - before, "time_s": time.perf_counter() - t0}


def bench_precompute_and_storage(cfg: Config, do_precompute: bool, do_storage: bool, n_examples: int = 64) -> dict:
    """Stage 1's work (the signal, Arrow write), exactly as precompute runs it, against a plain forward
    (full logits) over the same batches."""
    import pyarrow as pa
    from .. import store
    from ..data import pad
    from ..models import load_all
    from ..precompute import Teacher, length_batches
    device = dist.device()
    loaded = load_all(cfg, device)
    model = loaded.model.to(device).eval()
    teacher = Teacher(model, cfg, loaded.tok.pad_token_id, device, partitioned=False)
    signal = teacher.signal
    examples, _ = loaded.examples.examples(0, min(n_examples, len(loaded.examples)))
    n_tokens = sum(len(e.input_ids) for e in examples)
    tmp = tempfile.mkdtemp()
    out = {}

    def plain_forward():
        with torch.inference_mode():
            for batch in length_batches(examples, cfg.teacher.forward_tokens):
                ids, mask = pad([e.input_ids for e in batch], loaded.tok.pad_token_id)
                model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        sync(device)

    def stage1():
        rows = teacher.compute_shard(examples)
        store.write_shard(os.path.join(tmp, "bench.arrow"), rows.table(signal), cfg.teacher.compression)
        return rows

    rows = stage1()  # warm-up, and the rows for the storage figures
    if do_precompute:
        fwd, pre = [], []
        for _ in range(2):  # interleaved, best of two: the machine's load moves both alike
            t0 = time.perf_counter(); plain_forward(); fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); stage1(); pre.append(time.perf_counter() - t0)
        out["precompute"] = {"examples": len(examples), "tokens": n_tokens, "examples_per_s": len(examples) / min(pre),
                             "tokens_per_s": n_tokens / min(pre), "forward_tokens_per_s": n_tokens / min(fwd),
                             "ratio": min(fwd) / min(pre), "signal": signal.words()}
    if do_storage:
        by = {}
        positions = rows.position_count()
        for comp in ("none", "lz4", "zstd"):
            path = os.path.join(tmp, f"s-{comp}.arrow")
            entry = store.write_shard(path, rows.table(signal), comp)
            t0 = time.perf_counter()
            with pa.memory_map(path) as src:
                store.flatten(pa.ipc.open_stream(src).read_all(), signal)
            by[comp] = {"bytes": entry["bytes"], "bytes_per_position": entry["bytes"] / positions,
                        "bytes_per_entry": entry["bytes"] / signal.entries(rows.signal),
                        "read_s": time.perf_counter() - t0}
        out["storage"] = {"positions": positions, "signal": signal.words(), "value_dtype": signal.value_dtype,
                          "id_dtype": signal.id_dtype, "by_compression": by}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def signal_rows(signal, logp: torch.Tensor, example) -> dict:
    """The signal's arrays for one example's positions (all of its prompt), computed by the production
    code exactly as stage 1 computes them (logp (P, V) fp32 full-vocabulary log-probs)."""
    got = signal.row_fn([example], [np.arange(logp.shape[0])], logp.device)(logp.clone(), slice(0, logp.shape[0]))
    return signal.concat([signal.per_example({k: v.cpu().numpy() for k, v in got.items()})])


def bench_fidelity(cfg: Config, ks: list[int], n_examples: int = 8, samples: tuple = (16, 64)) -> dict:
    """How close the stored KL (top-k bucket and renormalized at several k; sampled at several N) is to the
    exact one, between the base and a fine-tuned model: the ratio of the summed KL values (the bias)
    and the cosine of the gradients with respect to the student's hidden states, with the bytes each
    signal stores per position (as the store writes them: the model's id dtype, fp16 values)."""
    from .. import store
    from ..eval.evaluate import load_run_model
    from ..loss import LiveTeacher
    from ..models import decoder_and_head, load_all, vocab_size
    device = dist.device()
    run_dir = cfg.eval.runs[0]
    student, _ = load_run_model(cfg, run_dir, torch.float32, device)
    loaded = load_all(cfg, device)
    base = loaded.model.to(device).eval()
    ids_dtype = store.id_dtype_for(vocab_size(base))
    signals = {**{("k", k): store.TopK(k, ids_dtype, "float16") for k in ks},
               **{("N", n): store.Sampled(n, cfg.teacher.seed, ids_dtype, "float16") for n in samples}}
    examples, _ = loaded.examples.examples(0, min(n_examples, len(loaded.examples)))
    (bb, bh), (sb, sh) = decoder_and_head(base), decoder_and_head(student)
    kl = {(key, mode): [0.0, []] for key in signals for mode in ("bucket", "renormalize")}
    arrays = {key: [] for key in signals}
    exact_total, exact_grads, positions = 0.0, [], 0
    for e in examples:
        ids = torch.tensor([e.input_ids], device=device)
        rb = torch.zeros(e.prompt_len, dtype=torch.long, device=device)
        rt = torch.arange(e.prompt_len, device=device)
        with torch.no_grad():
            th = bb(input_ids=ids).last_hidden_state[0, : e.prompt_len]
            hs = sb(input_ids=ids).last_hidden_state
            logp = torch.log_softmax(F.linear(th, bh.weight).float(), -1)

        def kl_and_grad(teacher, tail="bucket"):
            h = hs.detach().clone().requires_grad_()
            s, _ = kl_sum(h, sh.weight, None, rb, rt, teacher, tail=tail, chunk_rows=256)
            s.backward()
            return s.item(), h.grad[0, : e.prompt_len].flatten()

        s, gr = kl_and_grad(LiveTeacher(th, bh.weight))
        exact_total += s
        exact_grads.append(gr)
        positions += e.prompt_len
        for key, signal in signals.items():
            sig = signal_rows(signal, logp, e)
            arrays[key].append(sig)
            for mode in ("bucket", "renormalize") if key[0] == "k" else ("bucket",):
                s, g = kl_and_grad(signal.teacher([sig]).to_device(device), mode)
                kl[(key, mode)][0] += s
                kl[(key, mode)][1].append(g)
    ge = torch.cat(exact_grads)
    ratio_cos = lambda key, mode: (kl[(key, mode)][0] / exact_total,
                                   F.cosine_similarity(torch.cat(kl[(key, mode)][1]), ge, dim=0).item())
    bytes_of = lambda key: signals[key].bytes_per_position(
        {c: np.concatenate([a[c] for a in arrays[key]]) for c in arrays[key][0]})
    out, sampled_rows = [], []
    for k in ks:
        (br, bc), (rr, rc) = ratio_cos(("k", k), "bucket"), ratio_cos(("k", k), "renormalize")
        out.append({"k": k, "bucket_ratio": br, "bucket_cos": bc, "renorm_ratio": rr, "renorm_cos": rc,
                    "bytes_per_position": bytes_of(("k", k))})
    for n in samples:
        r, c = ratio_cos(("N", n), "bucket")
        unique = np.concatenate([a["sample_len"] for a in arrays[("N", n)]]).mean()
        sampled_rows.append({"samples": n, "ratio": r, "cos": c, "unique_per_position": float(unique),
                             "bytes_per_position": bytes_of(("N", n))})
    return {"run": run_dir, "examples": len(examples), "positions": positions, "id_dtype": ids_dtype,
            "exact_kl_per_token": exact_total / positions, "rows": out, "sampled_rows": sampled_rows}


def data(mode: str, cfg_path: str, n: int, num_proc: int, overrides: list[str]) -> dict:
    """Peak resident memory and wall time of loading and tokenizing n built-in RAG records.
    list: the first version's path (a Python list of records, tokenized in one process, a list of
    examples); datasets: data.load_examples (Arrow, datasets.map with num_proc, cached), in a fresh
    cache so that the work is done, then once more from the cache."""
    from ..data import OK, TRUNCATED, encode_record, load_examples
    from ..models import load_tokenizer_for
    from ..data import builtin
    cfg = load_config(cfg_path, list(overrides) + ["data.train=builtin:rag", f"data.builtin_train_size={n}",
                                                   f"data.num_proc={num_proc}", "data.long_policy=skip"])
    tok = load_tokenizer_for(cfg.model)
    device = torch.device("cpu")
    reset_peak(device)
    base = peak_bytes(device)
    t0 = time.perf_counter()
    out = {"mode": mode, "records": n, "num_proc": num_proc}
    if mode == "list":
        dc = cfg.data
        records = builtin.generate("train", n, seed=dc.builtin_seed, num_documents=dc.builtin_num_documents)
        examples = []
        for i, r in enumerate(records):
            ids, plen, status = encode_record(r, i, tok, dc, "builtin:rag")
            if status in (OK, TRUNCATED):
                examples.append((i, ids, plen))
        out["examples"] = len(examples)
    else:
        examples = load_examples(cfg.data.train, tok, cfg.data)
        out["examples"] = len(examples)
        out["first_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        load_examples(cfg.data.train, tok, cfg.data)
        out["cached_s"] = time.perf_counter() - t1
    out["time_s"] = time.perf_counter() - t0 - out.get("cached_s", 0.0)
    out["peak_bytes"] = peak_bytes(device)
    out["peak_above_start_bytes"] = out["peak_bytes"] - base
    return out


def scale(kind: str, recipe: str) -> dict:
    """One rank of a bench.scale measurement (launched by the deepspeed launcher): `train` = setup
    (loading) + one optimizer step; `precompute` = stage 1. Writes rank{R}.json to $SELFAUG_BENCH_OUT."""
    from .. import train as tr
    cfg = load_config(recipe)
    rank, world = dist.init()
    device = dist.device()
    t0 = time.perf_counter()
    out = {"kind": kind, "rank": rank, "world": world}
    if kind == "train":
        run = tr.setup(cfg)
        out["load_s"] = time.perf_counter() - t0
        out["load_peak_bytes"] = peak_bytes(device)
        rss = _proc_status_bytes("VmRSS")
        reset_peak(device)
        t1 = time.perf_counter()
        tokens = tr.train_step(run, 0, tr.step_coefficients(run, 0)).tokens
        sync(device)
        out.update(step_time_s=time.perf_counter() - t1, tokens=tokens, rss_before_step_bytes=rss,
                   step_peak_bytes=peak_bytes(device))
        out["peak_bytes"] = max(out["load_peak_bytes"], out["step_peak_bytes"])
    else:
        from .. import precompute, store
        precompute.run(cfg)
        out["time_s"] = time.perf_counter() - t0
        out["tokens"] = store.read_manifest(cfg.teacher.output_dir)["totals"]["tokens"] / world  # about this rank's
        out["peak_bytes"] = peak_bytes(device)
    with open(os.path.join(os.environ["SELFAUG_BENCH_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    return out


def saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (torch.autograd.graph.saved_tensors_hooks),
    each storage once, the parameters' own storages left out: the activation memory of a micro-batch."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def budget(cfg_path: str, overrides: list[str]) -> dict:
    """One epoch's micro-batches by count and by train.micro_batch_tokens (default: the median micro-batch by
    count, so the two run about as many), at the same global batch: processed tokens per micro-batch
    (largest, median) and the bytes saved for backward by the largest micro-batches of each."""
    from .. import train as tr
    from ..train.batches import StepSampler, to_device
    cfg = load_config(cfg_path, list(overrides) + ["train.teacher_mode=none", "train.alpha=0", "train.resume=never",
                                                   f"train.output_dir={tempfile.mkdtemp(prefix='selfaug-bench-budget-')}"])
    run = tr.setup(cfg)
    tc, tokens = cfg.train, run.lengths.tokens
    steps = -(-len(tokens) // (tc.micro_batch_size * tc.gradient_accumulation_steps))  # one epoch

    def sizes(sampler):
        mbs = [mb for t in range(steps) for p in sampler.plan(t) for mb in p if mb is not None]
        return mbs, np.array([run.layout.processed_tokens(list(tokens[mb])) for mb in mbs])

    args = (len(tokens), tc.micro_batch_size, tc.gradient_accumulation_steps, 1, tc.seed, tokens)
    count_mbs, count_sizes = sizes(StepSampler(*args, None, run.layout))
    budget_tokens = tc.micro_batch_tokens or max(int(np.median(count_sizes)), int(tokens.max()))
    budget_mbs, budget_sizes = sizes(StepSampler(*args, budget_tokens, run.layout))
    objective = run.engine.module
    params = list(objective.parameters())
    out = {"budget": budget_tokens, "steps": steps, "examples": len(tokens), "layout": run.layout.name}
    for name, mbs, sz in (("count", count_mbs, count_sizes), ("tokens", budget_mbs, budget_sizes)):
        largest = []
        for j in np.argsort(-sz)[:2]:  # activation memory grows with the processed tokens: the two largest
            rows = [run.source.examples.example(int(i)) for i in mbs[j]]
            batch = to_device(run.source.batch(rows, run.tok.pad_token_id, run.layout), run.device)
            largest.append(saved_bytes(lambda: objective(batch, 1.0, 0.0)[0], params))
        out[name] = {"micro_batches": len(mbs), "tokens_max": int(sz.max()), "tokens_median": float(np.median(sz)),
                     "tokens_mean": float(sz.mean()), "saved_bytes_max": max(largest)}
    return out


def main(argv: list[str]) -> dict:
    """One measurement from its arguments: {step|long|scale|budget|data} ARGS."""
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    what, args = argv[0], argv[1:]
    if what == "step":
        return step(args[0], args[1], int(args[2]), args[3:])
    if what == "long":
        return long(*(int(a) for a in args))
    if what == "scale":
        return scale(args[0], args[1])
    if what == "budget":
        return budget(args[0], args[1:])
    if what == "data":
        return data(args[0], args[1], int(args[2]), int(args[3]), args[4:])
    raise SystemExit(f"unknown benchmark worker {what!r}")


if __name__ == "__main__":
    dist.ensure_env()
    print(json.dumps(main(sys.argv[1:])))
