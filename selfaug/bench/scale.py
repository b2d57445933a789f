"""`selfaug bench --only scale` (docs/design.md, "Benchmarks"): the large-model paths on this machine, at
a scale that shows them. Every measurement is a fresh 2-rank launch (`deepspeed --num_gpus 2`, gloo
on a CPU; in `--smoke` one rank, in this process) of `worker scale ...`, each rank reporting its own peak resident memory:

- loading + one LoRA step of a random Llama of 1.24B parameters (fp32), ZeRO-3 against ZeRO-2;
- loading + one full fine-tuning AdamW step of a 0.38B one, ZeRO-3 against ZeRO-2;
- stage 1 with the ZeRO-3 partitioned teacher against one whole teacher per rank (1.24B);
- one step at 2,048 tokens with and without activation checkpointing (SmolLM2-135M, one process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .. import dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SCALE = os.path.join(ROOT, "recipes", "scale")


def _base(tmp: str, model_dir: str, smoke: bool) -> dict:
    """A recipe for the scale runs: random weights at `model_dir`'s shape, short built-in RAG data."""
    return {
        "model": {"name_or_path": model_dir, "init": "random", "dtype": "float32"},
        "data": {"train": "builtin:rag", "builtin_train_size": 8, "max_seq_len": 512, "builtin_num_documents": 1},
        "teacher": {"output_dir": os.path.join(tmp, "teacher"), "k": 8, "shard_size": 2, "forward_tokens": 1024,
                    "vocab_chunk_rows": 128},
        "train": {"output_dir": os.path.join(tmp, "run"), "max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                  "alpha": 0.0, "teacher_mode": "none", "optim": "adamw_torch", "learning_rate": 1e-4, "loss_chunk_rows": 128,
                  "resume": "never"},
    }


def _launch(kind: str, raw: dict, tmp: str, nprocs: int = 2, in_process: bool = False) -> list[dict]:
    """One measurement: `nprocs` ranks of bench.worker; the reports of every rank. `in_process` (the
    smoke, one rank): the worker runs in this process."""
    import yaml
    recipe = os.path.join(tmp, f"{kind}-{len(os.listdir(tmp))}.yaml")
    with open(recipe, "w") as f:
        yaml.safe_dump(raw, f)
    out = os.path.join(tmp, f"out-{len(os.listdir(tmp))}")
    os.makedirs(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SELFAUG_BENCH_OUT=out)
    worker = ["--module", "selfaug.bench.worker", "scale", kind, recipe]
    if in_process and nprocs == 1:
        from unittest import mock

        from .worker import scale
        with mock.patch.dict(os.environ, SELFAUG_BENCH_OUT=out):
            return [scale(kind, recipe)]
    if nprocs == 1:  # one process needs no launcher (the worker sets up a world of one)
        cmd = [sys.executable, "-m", *worker[1:]]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nprocs), "--master_port",
               str(dist.free_port()), *worker]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"scale benchmark {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nprocs)]


def _pair(name: str, a: list[dict], b: list[dict], key: str) -> dict:
    """Per-rank maxima of `key` for the variant `a` against the reference `b`."""
    pa, pb = max(r[key] for r in a), max(r[key] for r in b)
    print(f"  scale[{name}]: {pa / 2**30:.2f} GiB against {pb / 2**30:.2f} GiB per rank ({pa / pb:.3f}x)", flush=True)
    return {"variant_peak_bytes": pa, "reference_peak_bytes": pb, "ratio": pa / pb, "variant": a, "reference": b}


# ranks per launch: the smoke runs each on one, the same code (tests/train/test_scale.py checks ZeRO-3
# against ZeRO-2 on two)
RANKS = {False: 2, True: 1}


def _zero3_vs_zero2(tmp: str, model: str, method: str, label: str, smoke: bool) -> dict:
    runs = {}
    for stage in (2, 3):
        raw = _base(tmp, model, smoke)
        raw["train"].update(adapter={"full": "none"}.get(method, method), deepspeed=os.path.join(ROOT, f"ds_configs/zero{stage}.json"))
        runs[stage] = _launch("train", raw, tmp, RANKS[smoke], smoke)
    return _pair(f"{label}, load + 1 step, ZeRO-3 vs ZeRO-2", runs[3], runs[2], "peak_bytes")


def bench_scale(smoke: bool = False) -> dict:
    results = {}
    big = os.path.join(SCALE, "llama-1b") if not smoke else "builtin:tiny-llama"
    mid = os.path.join(SCALE, "llama-400m") if not smoke else "builtin:tiny-llama"
    with tempfile.TemporaryDirectory(prefix="selfaug-bench-scale-") as tmp:
        # LoRA, then full fine-tuning with AdamW (parameters, gradients, Adam states): ZeRO-3 (created
        # partitioned) against ZeRO-2 (a whole model per rank)
        results["lora_load_and_step"] = _zero3_vs_zero2(tmp, big, "lora", "LoRA 1.2B", smoke)
        if not smoke:  # the smoke runs the pair once (LoRA): the same code
            results["full_load_and_step"] = _zero3_vs_zero2(tmp, mid, "full", "full AdamW 0.38B", smoke)
        # stage 1: a partitioned teacher against a whole teacher per rank
        runs = {}
        for mode in ("whole", "partitioned"):
            raw = _base(tmp, big, smoke)
            raw["teacher"]["output_dir"] = os.path.join(tmp, f"teacher-{mode}")
            if mode == "partitioned":
                raw["teacher"]["deepspeed"] = os.path.join(ROOT, "ds_configs/zero3_inference.json")
            runs[mode] = _launch("precompute", raw, tmp, RANKS[smoke], smoke)
        pair = _pair("stage 1 1.2B, partitioned vs whole teacher", runs["partitioned"], runs["whole"], "peak_bytes")
        tps = {m: sum(r["tokens"] for r in runs[m]) / max(r["time_s"] for r in runs[m]) for m in runs}
        pair["tokens_per_s"] = tps
        pair["throughput_ratio"] = tps["partitioned"] / tps["whole"]
        print(f"  scale[stage 1 throughput]: partitioned {tps['partitioned']:.0f} tokens/s, whole "
              f"{tps['whole']:.0f} tokens/s ({pair['throughput_ratio']:.3f}x)", flush=True)
        results["stage1"] = pair
        # activation checkpointing: one step at about 2,048 tokens, one process
        runs = {}
        for gc in (False, True):
            raw = _base(tmp, "builtin:smollm2-135m-instruct" if not smoke else "builtin:tiny-llama", smoke)
            raw["model"]["init"] = "pretrained"
            raw["data"].update(builtin_num_documents=38 if not smoke else 4, max_seq_len=4096)
            raw["train"].update(adapter="lora", gradient_checkpointing=gc, deepspeed=os.path.join(ROOT, "ds_configs/zero0.json"))
            runs[gc] = _launch("train", raw, tmp, 1, smoke)
        pair = _pair("one step at 2K tokens, checkpointing vs not", runs[True], runs[False], "step_peak_bytes")
        pair["tokens"] = runs[True][0]["tokens"]
        growth = {gc: runs[gc][0]["step_peak_bytes"] - runs[gc][0]["rss_before_step_bytes"] for gc in runs}
        pair["step_growth_bytes"] = {"checkpointing": growth[True], "none": growth[False]}
        pair["step_growth_ratio"] = growth[True] / max(growth[False], 1)
        pair["time_ratio"] = runs[True][0]["step_time_s"] / runs[False][0]["step_time_s"]
        print(f"  scale[checkpointing]: {pair['tokens']} tokens, step memory growth {growth[True] / 2**20:.0f} against "
              f"{growth[False] / 2**20:.0f} MiB ({pair['step_growth_ratio']:.3f}x), time {pair['time_ratio']:.3f}x",
              flush=True)
        results["checkpointing"] = pair
    return results


def format_scale(r: dict) -> str:
    lines = ["scale (2 ranks, gloo, fp32, peak resident memory per rank):"]
    names = {"lora_load_and_step": "LoRA 1.2B load+step  ZeRO-3 / ZeRO-2 (target <= 0.6)",
             "full_load_and_step": "full 0.38B load+step ZeRO-3 / ZeRO-2 (target <= 0.6)",
             "stage1": "stage 1 1.2B partitioned / whole     (target <= 0.6)",
             "checkpointing": "2K-token step, checkpointing / not  (1 process)"}
    for key, label in names.items():
        if key in r:
            x = r[key]
            lines.append(f"  {label}: {x['variant_peak_bytes'] / 2**30:.2f} / {x['reference_peak_bytes'] / 2**30:.2f} "
                         f"GiB = {x['ratio']:.3f}")
    if "stage1" in r:
        lines.append(f"  stage 1 throughput partitioned / whole: {r['stage1']['throughput_ratio']:.3f}")
    if "checkpointing" in r:
        c = r["checkpointing"]
        lines.append(f"  checkpointing, {c['tokens']} tokens: memory the step adds "
                     f"{c['step_growth_bytes']['checkpointing'] / 2**20:.0f} / {c['step_growth_bytes']['none'] / 2**20:.0f}"
                     f" MiB = {c['step_growth_ratio']:.3f}; step time ratio {c['time_ratio']:.3f}")
    return "\n".join(lines)
