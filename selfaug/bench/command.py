"""Benchmarks (docs/design.md, "Benchmarks"): each prints a table of ratios measured in one invocation and
writes JSON. Not timed tests: CI runs a tiny smoke of each.

  step       step time and peak memory: vanilla LoRA (Hugging Face loss), offline SelfAug, online
             SelfAug, and the selfaug loop at alpha=0; each variant in its own process
  precompute stage 1 (teacher top-k, tail, Arrow write) against a plain forward over the same batches
  storage    bytes per stored position and per (id, value) entry, per Arrow compression
  fidelity   KL_bucket / KL_exact and the cosine of their gradients at several k, and the
             renormalized variant, between the base model and a fine-tuned run (bench.run_dir)
  long       peak memory of the loss against prompt length, chunked against unchunked
  data       loading and tokenizing many records: the first version's lists against datasets
  scale      ZeRO-3 against ZeRO-2 at 2 ranks on random models of real shapes (scale.py)
  packing    length-skewed data: padding, tokens/s and step time, packed against padded batches
  budget     train.micro_batch_tokens against micro-batches by count on length-skewed data, one epoch at the same
             global batch: tokens per micro-batch (largest against median), bytes saved for backward by the
             largest micro-batch, step time
  positions  teacher.position_fraction 1 / 0.5 / 0.25 / 0.1: store bytes and offline step time
  open       a 1 GB store opened by 1, 2 and 4 ranks: seconds and bytes hashed per rank (cluster.py)
  checkpoint one checkpoint save of full fine-tuning (AdamW, ZeRO-3) at the 8B width on 1, 2 and 4 ranks:
             bytes each rank writes and gathers, seconds; a resume at another world size (checkpoints.py)
  reader     rows -> collated micro-batch with its teacher: ms and stored positions per second (cluster.py)
  hf         SelfAugTrainer (selfaug.hf) against a plain Trainer SFT step on the same batches and against
             selfaug train's step: step time and peak memory (trainers.py)
  prefetch   the share of a step waiting for data, train.prefetch 0 against 2, on the store and on a slow disk,
             and from the store on object storage (S3: moto's local server, or $SELFAUG_BENCH_STORE_URL)
  loss       the head's loss at the Llama-3-8B head: saved-for-backward bytes, head frozen and trained
  gpu        one GPU (`launch.sh gpu-check`, gpu.py): flash-attention packed = padded, bf16 against fp32, the
             collective timeout, the memory plan's lines, stage 1, the step and packing, at the 7B shape with 4
             layers, random weights, bf16
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .. import dist
from ..config import Config

SECTIONS = ("step", "precompute", "storage", "fidelity", "long", "data", "scale", "packing", "budget", "positions",
            "open", "reader", "hf", "checkpoint", "prefetch", "loss", "drift", "gpu")
# only when asked: drift (it reads an evaluation that has run), gpu (it needs a CUDA GPU)
DEFAULT = tuple(s for s in SECTIONS if s not in ("drift", "gpu"))

# length-skewed built-in data for the packing and position benchmarks, unless the recipe has its own
SKEWED = ["data.builtin_num_documents=1", "data.builtin_max_documents=8", "data.builtin_extra_sentences=2",
          "data.max_seq_len=1024"]


# --smoke: every measurement runs in this process (the same code, read as a check that it runs: a smoke's
# figures mean nothing), saving a fresh interpreter and its imports each; a worker's own environment is set
# around it, where a variable read at import (HF_DATASETS_CACHE) keeps this process's value
IN_PROCESS = False


def _worker(cmd: list[str], module: str = "selfaug.bench.worker", **env_extra) -> dict:
    """Run one measurement in a fresh process (peak memory of a process is not resettable downwards)."""
    if IN_PROCESS:
        import importlib
        from unittest import mock
        with mock.patch.dict(os.environ, env_extra):
            return importlib.import_module(module).main(cmd)
    # a fresh single-process rendezvous: never the parent's port or rank
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", module, *cmd], capture_output=True, text=True,
                         env={**env, "PYTHONUNBUFFERED": "1", **env_extra})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {cmd} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_step(cfg_path: str, overrides: list[str], steps: int) -> dict:
    rows = {}
    for variant in ("vanilla_lora", "offline", "online", "alpha0"):
        rows[variant] = _worker(["step", variant, cfg_path, str(steps), *overrides])
        print(f"  step[{variant}]: {rows[variant]['step_time_s']:.3f} s/step, "
              f"peak {rows[variant]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    base = rows["vanilla_lora"]
    for r in rows.values():
        r["time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def bench_hf(cfg_path: str, overrides: list[str], steps: int) -> dict:
    """SelfAugTrainer (stored top-k) against a plain Trainer SFT step on the same batches, and against
    `selfaug train`'s step: median step time and peak memory, each in a fresh process."""
    rows = {"plain_trainer": _worker(["plain", cfg_path, str(steps), *overrides], "selfaug.bench.trainers"),
            "selfaug_trainer": _worker(["selfaug", cfg_path, str(steps), *overrides], "selfaug.bench.trainers"),
            "selfaug_train": _worker(["step", "offline", cfg_path, str(steps), *overrides])}
    s = rows["selfaug_trainer"]
    ratios = {f"{k}_vs_{b}": s[k] / rows[b][k] for k in ("step_time_s", "peak_bytes")
              for b in ("plain_trainer", "selfaug_train")}
    for name, r in rows.items():
        print(f"  hf[{name}]: {r['step_time_s']:.3f} s/step, peak {r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"rows": rows, **ratios}


def bench_long(lengths: list[int], vocab: int, hidden: int, k: int, chunk: int) -> dict:
    rows = []
    for T in lengths:
        row = {"tokens": T}
        for mode, rows_per_chunk in (("chunked", chunk), ("unchunked", T)):
            r = _worker(["long", str(T), str(vocab), str(hidden), str(k), str(rows_per_chunk)])
            row[f"{mode}_peak_bytes"] = r["loss_peak_bytes"]
            row[f"{mode}_time_s"] = r["time_s"]
        row["ratio"] = row["chunked_peak_bytes"] / max(row["unchunked_peak_bytes"], 1)
        print(f"  long[{T}]: chunked {row['chunked_peak_bytes'] / 2**20:.0f} MiB, unchunked "
              f"{row['unchunked_peak_bytes'] / 2**20:.0f} MiB", flush=True)
        rows.append(row)
    return {"vocab": vocab, "hidden": hidden, "k": k, "chunk_rows": chunk, "rows": rows}


def bench_data(cfg_path: str, overrides: list[str], n: int) -> dict:
    """Loading and tokenizing n built-in RAG records: the first version's list path against
    data.load_examples with 1 and 2 processes, each in a fresh process and a fresh cache."""
    import tempfile
    rows = {}
    for mode, procs in (("list", 1), ("datasets", 1), ("datasets", 2)):
        cache = tempfile.mkdtemp(prefix="selfaug-bench-data-")
        r = _worker(["data", mode, cfg_path, str(n), str(procs), *overrides], SELFAUG_DATA_CACHE=cache,
                    HF_DATASETS_CACHE=os.path.join(cache, "hf"))
        rows[f"{mode}_{procs}"] = r
        print(f"  data[{mode}, {procs} proc]: {r['time_s']:.1f} s, peak {r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
        import shutil
        shutil.rmtree(cache, ignore_errors=True)
    base = rows["list_1"]
    for r in rows.values():
        r["time_ratio"] = r["time_s"] / base["time_s"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return {"records": n, "rows": rows}


def _skewed(cfg: Config, overrides: list[str]) -> list[str]:
    return list(overrides) + ([] if cfg.data.builtin_max_documents else SKEWED)


def bench_packing(cfg: Config, cfg_path: str, overrides: list[str], steps: int) -> dict:
    """The selfaug step (alpha = 0: the KL's cost does not depend on the layout) on length-skewed data,
    padded against packed, each in its own process."""
    rows = {}
    for packing in (False, True):  # plain fine-tuning on the data: no store needed
        r = _worker(["step", "alpha0", cfg_path, str(steps), *_skewed(cfg, overrides), "train.teacher_mode=none",
                     f"train.packing={packing}"])
        rows["packed" if packing else "padded"] = r
        print(f"  packing[{packing}]: {r['step_time_s']:.3f} s/step, padding {r['padding']:.3f}", flush=True)
    p, u = rows["packed"], rows["padded"]
    return {"rows": rows, "time_ratio": p["step_time_s"] / u["step_time_s"],
            "tokens_per_s_ratio": p["tokens_per_s"] / u["tokens_per_s"]}


# the budget benchmark's global batch: 16 examples a step, packed into rows as long as a micro-batch may be
BUDGET = ["train.gradient_accumulation_steps=4", "train.packing=true", "train.pack_tokens=4096"]


def bench_budget(cfg: Config, cfg_path: str, overrides: list[str], steps: int) -> dict:
    """Micro-batches by count against train.micro_batch_tokens: the epoch's plans and activation bytes in one
    process, then the step time of each in its own."""
    args = BUDGET + _skewed(cfg, overrides)
    r = _worker(["budget", cfg_path, *args])
    for mode, extra in (("count", ["train.micro_batch_tokens=null"]), ("tokens", [f"train.micro_batch_tokens={r['budget']}"])):
        step = _worker(["step", "alpha0", cfg_path, str(steps), *args, "train.teacher_mode=none", *extra])
        r[mode]["step_time_s"] = step["step_time_s"]
    c, t = r["count"], r["tokens"]
    r.update(largest_over_median=t["tokens_max"] / t["tokens_median"],
             count_largest_over_median=c["tokens_max"] / c["tokens_median"],
             saved_ratio=t["saved_bytes_max"] / c["saved_bytes_max"], time_ratio=t["step_time_s"] / c["step_time_s"])
    print(f"  budget: largest/median {r['largest_over_median']:.2f} (by count {r['count_largest_over_median']:.2f}), "
          f"activation x {r['saved_ratio']:.2f}, step time x {r['time_ratio']:.3f}", flush=True)
    return r


def bench_positions(cfg: Config, cfg_path: str, overrides: list[str], fractions: list[float], examples: int,
                    steps: int) -> dict:
    """Per position fraction: a store of `examples` length-skewed records (its bytes, stage 1 time) and the
    offline SelfAug step on it."""
    import shutil
    import tempfile
    import time
    from .. import precompute, store
    from ..config import load_config
    tmp = tempfile.mkdtemp(prefix="selfaug-bench-positions-")
    rows = []
    try:
        for f in fractions:
            extra = _skewed(cfg, overrides) + [f"data.max_examples={examples}", f"teacher.position_fraction={f}",
                                               f"teacher.output_dir={tmp}/f{f}", "teacher.overwrite=true"]
            t0 = time.perf_counter()
            precompute.run(load_config(cfg_path, extra))
            totals = store.read_manifest(f"{tmp}/f{f}")["totals"]
            r = {"fraction": f, "precompute_s": time.perf_counter() - t0, "bytes": totals["bytes"],
                 "positions": totals["positions"], "bytes_per_example": totals["bytes"] / max(totals["examples"], 1)}
            step = _worker(["step", "offline", cfg_path, str(steps), *extra])
            r.update(step_time_s=step["step_time_s"], kl_positions_per_step=step["kl_positions"])
            rows.append(r)
            print(f"  positions[{f}]: {r['bytes'] / 1e6:.2f} MB, {r['step_time_s']:.3f} s/step", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["bytes_ratio"] = r["bytes"] / rows[0]["bytes"]
        r["step_time_ratio"] = r["step_time_s"] / rows[0]["step_time_s"]
    return {"examples": examples, "rows": rows}


def bench_prefetch(cfg_path: str, overrides: list[str], steps: int, smoke: bool) -> dict:
    """The share of a step waiting for data, micro-batches made on the step or ahead on a thread, from the store
    as it is and as read from a slow disk (data_wait.py), each run in its own process."""
    rows = []
    for delay in (0.0, 5.0 if smoke else 25.0):
        for prefetch in (0, 2):
            r = _worker([cfg_path, str(prefetch), str(delay), str(steps), *overrides], module="selfaug.bench.data_wait")
            rows.append(r)
            print(f"  prefetch[{prefetch}, {delay:g} ms/example]: {r['wait_share']:.3f} of the step waiting for data, "
                  f"{r['step_time_s']:.3f} s/step", flush=True)
    same = all(a["nll"] == b["nll"] for a, b in zip(rows[0::2], rows[1::2]))
    from ..config import load_config
    from .data_wait import object_store_copy
    try:
        with object_store_copy(load_config(cfg_path, list(overrides)).teacher.output_dir) as (url, env):
            if url is None:
                print(f"  object store: not measured: {env}", flush=True)
                return {"rows": rows, "same_losses": same, "object_store": {"skipped": env}}
            r = _worker([cfg_path, "2", "0", str(steps), *overrides, f"teacher.output_dir={url}"],
                        module="selfaug.bench.data_wait", **env)
            # by shards: the manifest and sidecars before step 1, the shards downloaded during the steps
            fresh = {**env, "SELFAUG_STORE_CACHE": os.path.join(env["SELFAUG_STORE_CACHE"], "by-shards")}  # a new node
            by_shards = [_worker([cfg_path, "2", "0", str(steps), *overrides, "train.order=shards", *where],
                                 module="selfaug.bench.data_wait", **fresh) for where in ([], [f"teacher.output_dir={url}"])]
    except Exception as e:  # noqa: BLE001 - the local rows stand; the object store's failure is recorded
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        print(f"  object store: failed: {why}", flush=True)
        return {"rows": rows, "same_losses": same, "object_store": {"error": why}}
    local = rows[1]  # the same store on local disk, prefetch 2
    r.update(url=url.split("://")[0] + "://...", step_time_vs_local_disk=r["step_time_s"] / local["step_time_s"],
             same_losses_as_local_disk=r["nll"] == local["nll"],
             pull_share=r["pull_s"] / (r["pull_s"] + r["steps"] * r["step_time_s"]))
    print(f"  object store[{r['url']}, prefetch 2]: mirror pulled in {r['pull_s']:.2f} s "
          f"({r['pulled_bytes'] / 1e6:.1f} MB, {r['pulled_bytes'] / 1e6 / r['pull_s']:.0f} MB/s) before step 1, then "
          f"{r['wait_share']:.3f} of the step waiting for data, {r['step_time_s']:.3f} s/step "
          f"({r['step_time_vs_local_disk']:.2f}x local disk)", flush=True)
    disk, s3 = by_shards
    got = s3["shards"]
    s3.update(url=r["url"], step_time_vs_local_disk=s3["step_time_s"] / disk["step_time_s"],
              same_losses_as_local_disk=s3["nll"] == disk["nll"], local_disk=disk)
    print(f"  object store by shards[prefetch 2]: manifest and sidecars in {s3['pull_s']:.2f} s, then "
          f"{len(got['downloaded'])} of {got['shards']} shards ({got['bytes_downloaded'] / 1e6:.1f} MB) downloaded during "
          f"the steps, at most {got['most_held']} held, {got['wait_for_download_s']:.2f} s waiting for them; "
          f"{s3['wait_share']:.3f} of the step waiting for data, {s3['step_time_s']:.3f} s/step "
          f"({s3['step_time_vs_local_disk']:.2f}x the same order from local disk)", flush=True)
    return {"rows": rows, "same_losses": same, "object_store": r, "object_store_by_shards": s3}


def run(cfg: Config, only: list[str], out_path: str, cfg_path: str | None = None, overrides=(),
        smoke: bool = False) -> dict:
    from . import worker as bw
    global IN_PROCESS
    IN_PROCESS = smoke
    only = only or list(DEFAULT)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown benchmark sections {sorted(unknown)}; choose from {SECTIONS}")
    dist.ensure_env()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads(), "model": cfg.model.name_or_path, "smoke": smoke}
    if "storage" in only or "precompute" in only:
        results.update(bw.bench_precompute_and_storage(cfg, "precompute" in only, "storage" in only))
    if "step" in only:
        results["step"] = bench_step(cfg_path, list(overrides), 2 if smoke else 5)
    if "fidelity" in only:
        results["fidelity"] = bw.bench_fidelity(cfg, [2, 4] if smoke else [8, 16, 32, 64, 128], 3 if smoke else 8)
    if "long" in only:
        lengths = [128, 256] if smoke else [512, 1024, 2048, 4096, 8192]
        results["long"] = bench_long(lengths, 4096 if smoke else 49152, 64 if smoke else 576, 64 if not smoke else 8,
                                     64 if smoke else 1024)
    if "data" in only:
        results["data"] = bench_data(cfg_path, list(overrides), 400 if smoke else 200_000)
    if "scale" in only:
        from .scale import bench_scale
        results["scale"] = bench_scale(smoke)
    if "packing" in only:
        results["packing"] = bench_packing(cfg, cfg_path, list(overrides), 1 if smoke else 5)
    if "budget" in only:
        results["budget"] = bench_budget(cfg, cfg_path, list(overrides), 1 if smoke else 4)
    if "positions" in only:
        results["positions"] = bench_positions(cfg, cfg_path, list(overrides), [1.0, 0.25] if smoke else
                                               [1.0, 0.5, 0.25, 0.1], 8 if smoke else 48, 1 if smoke else 4)
    from . import cluster as bc
    if "open" in only:
        results["open"] = bc.bench_open(0.05 if smoke else 1.0, (1,) if smoke else (1, 2, 4))
    if "reader" in only:
        results["reader"] = bc.bench_reader(batches=20 if smoke else 200)
    if "hf" in only:
        results["hf"] = bench_hf(cfg_path, list(overrides), 2 if smoke else 6)
    if "checkpoint" in only:
        from .checkpoints import bench_checkpoint
        results["checkpoint"] = bench_checkpoint(smoke)
    if "prefetch" in only:
        results["prefetch"] = bench_prefetch(cfg_path, list(overrides), 2 if smoke else 8, smoke)
    if "loss" in only:
        from .head_buffers import bench_head_buffers
        results["loss"] = bench_head_buffers(smoke)
    if "drift" in only:
        from .drift_gap import bench_drift_k
        results["drift"] = bench_drift_k(cfg)
    if "gpu" in only:
        from . import gpu
        results["gpu"] = gpu.run(cfg_path, list(overrides), smoke, bench_step, bench_packing)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    print(format_results(results), flush=True)
    return results


def format_results(r: dict) -> str:
    lines = [f"benchmarks on {r['device']} ({r['threads']} threads), model {r['model']}"]
    if "precompute" in r:
        p = r["precompute"]
        lines += [f"precompute: {p['examples_per_s']:.2f} examples/s, {p['tokens_per_s']:.0f} tokens/s; plain forward "
                  f"{p['forward_tokens_per_s']:.0f} tokens/s; ratio {p['ratio']:.3f} (target >= 0.9)"]
    if "storage" in r:
        for c, s in r["storage"]["by_compression"].items():
            lines.append(f"storage[{c}]: {s['bytes_per_position']:.1f} bytes/position, {s['bytes_per_entry']:.3f} "
                         f"bytes per (id, value) entry incl. tail and positions (target <= 4), read {s['read_s']:.3f} s")
    if "step" in r:
        lines.append(f"{'variant':<14}{'s/step':>9}{'tokens/s':>10}{'peak MiB':>10}{'time x':>8}{'mem x':>8}")
        for name, s in r["step"].items():
            lines.append(f"{name:<14}{s['step_time_s']:>9.3f}{s['tokens_per_s']:>10.0f}{s['peak_bytes'] / 2**20:>10.0f}"
                         f"{s['time_ratio']:>8.3f}{s['memory_ratio']:>8.3f}")
    if "fidelity" in r:
        f = r["fidelity"]
        lines.append(f"fidelity vs exact KL (exact mean KL {f['exact_kl_per_token']:.4f}/token):")
        lines.append(f"{'k':>5}{'bucket/exact':>14}{'cos(grad)':>11}{'renorm/exact':>14}{'cos(grad)':>11}")
        lines[-1] += f"{'bytes/pos':>11}"
        for row in f["rows"]:
            lines.append(f"{row['k']:>5}{row['bucket_ratio']:>14.4f}{row['bucket_cos']:>11.4f}"
                         f"{row['renorm_ratio']:>14.4f}{row['renorm_cos']:>11.4f}{row['bytes_per_position']:>11.1f}")
        lines.append(f"{'N':>5}{'sampled/exact':>14}{'cos(grad)':>11}{'unique ids':>14}{'':>11}{'bytes/pos':>11}")
        for row in f.get("sampled_rows", []):
            lines.append(f"{row['samples']:>5}{row['ratio']:>14.4f}{row['cos']:>11.4f}"
                         f"{row['unique_per_position']:>14.2f}{'':>11}{row['bytes_per_position']:>11.1f}")
    if "long" in r:
        lines.append(f"{'tokens':>7}{'chunked MiB':>13}{'unchunked MiB':>15}{'ratio':>8}")
        for row in r["long"]["rows"]:
            lines.append(f"{row['tokens']:>7}{row['chunked_peak_bytes'] / 2**20:>13.1f}"
                         f"{row['unchunked_peak_bytes'] / 2**20:>15.1f}{row['ratio']:>8.3f}")
    if "data" in r:
        lines.append(f"data: {r['data']['records']} records, load + tokenize")
        lines.append(f"{'path':<16}{'time s':>9}{'peak MiB':>10}{'time x':>8}{'mem x':>8}{'cached s':>10}")
        for name, d in r["data"]["rows"].items():
            cached = f"{d['cached_s']:.2f}" if "cached_s" in d else "-"
            lines.append(f"{name:<16}{d['time_s']:>9.1f}{d['peak_bytes'] / 2**20:>10.0f}{d['time_ratio']:>8.3f}"
                         f"{d['memory_ratio']:>8.3f}{cached:>10}")
    if "scale" in r:
        from .scale import format_scale
        lines.append(format_scale(r["scale"]))
    if "packing" in r:
        p = r["packing"]
        lines.append(f"packing (length-skewed data): {'layout':<8}{'s/step':>9}{'tokens/s':>10}{'padding':>9}")
        for name, row in p["rows"].items():
            lines.append(f"{'':<30}{name:<8}{row['step_time_s']:>9.3f}{row['tokens_per_s']:>10.0f}{row['padding']:>9.3f}")
        lines.append(f"  packed / padded: step time {p['time_ratio']:.3f} (target <= 0.75 where padding >= 0.30), "
                     f"tokens/s {p['tokens_per_s_ratio']:.3f}")
    if "budget" in r:
        b = r["budget"]
        lines.append(f"micro-batches by count and by train.micro_batch_tokens={b['budget']} ({b['examples']} examples, one epoch "
                     f"of {b['steps']} steps, the same global batch):")
        lines.append(f"{'':<4}{'mode':<8}{'micro-batches':>14}{'largest':>9}{'median':>8}{'saved MiB':>11}{'s/step':>8}")
        for mode in ("count", "tokens"):
            m = b[mode]
            lines.append(f"{'':<4}{mode:<8}{m['micro_batches']:>14}{m['tokens_max']:>9}{m['tokens_median']:>8.0f}"
                         f"{m['saved_bytes_max'] / 2**20:>11.1f}{m['step_time_s']:>8.2f}")
        lines.append(f"  by tokens: largest / median {b['largest_over_median']:.3f} (target <= 1.1; by count "
                     f"{b['count_largest_over_median']:.3f}), largest activation x {b['saved_ratio']:.3f} of by count "
                     f"(target <= 0.6), step time x {b['time_ratio']:.3f} (target <= 1.05)")
    if "positions" in r:
        lines.append(f"positions ({r['positions']['examples']} length-skewed examples): "
                     f"{'fraction':>8}{'MB':>8}{'bytes x':>9}{'s/step':>9}{'time x':>8}")
        for row in r["positions"]["rows"]:
            lines.append(f"{'':<42}{row['fraction']:>8}{row['bytes'] / 1e6:>8.2f}{row['bytes_ratio']:>9.3f}"
                         f"{row['step_time_s']:>9.3f}{row['step_time_ratio']:>8.3f}")
    if "open" in r:
        o = r["open"]
        lines.append(f"store open ({o['bytes'] / 1e9:.2f} GB, k=64): {'ranks':>5}{'s (max)':>9}{'GB hashed/rank':>16}"
                     f"{'x 1 rank':>10}{'target':>8}")
        for row in o["rows"]:
            lines.append(f"{'':<30}{row['world']:>5}{row['seconds_max']:>9.2f}{row['bytes_hashed_max'] / 1e9:>16.3f}"
                         f"{row['work_ratio']:>10.3f}{row['target']:>8.2f}")
    if "reader" in r:
        for row in r["reader"]["rows"]:
            lines.append(f"reader[{row['signal']}]: {row['ms_per_micro_batch']:.3f} ms per micro-batch of "
                         f"{row['micro_batch']}, {row['positions_per_s'] / 1e6:.2f} M stored positions/s")
    if "hf" in r:
        h = r["hf"]
        lines.append(f"hf: SelfAugTrainer / plain Trainer: step time x{h['step_time_s_vs_plain_trainer']:.2f} (target "
                     f"<= 1.30), peak memory x{h['peak_bytes_vs_plain_trainer']:.2f} (<= 1.10); / selfaug train: step "
                     f"time x{h['step_time_s_vs_selfaug_train']:.2f} (<= 1.10), peak x{h['peak_bytes_vs_selfaug_train']:.2f}")
    if "checkpoint" in r:
        from .checkpoints import format_checkpoint
        lines.append(format_checkpoint(r["checkpoint"]))
    return "\n".join(lines)
