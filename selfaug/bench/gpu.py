"""`launch.sh gpu-check` (docs/design.md, "Benchmarks"; `python -m selfaug.bench.gpu`, also `selfaug bench
--only gpu`): the GPU path's checks on one GPU, each figure against a stated bound, written to gpu_check.json
(under $OUT) with pass/fail per bound and whether flash-attention was real or emulated; the command exits 1
and names every bound missed.

  attention, accumulation, bf16   gpu_numerics.py: packed = padded on the pretrained SmolLM2 under
                 flash_attention_2 (hidden states, the head's gradient; the multi-row layout shown to break the
                 bound), ZeRO-3 bf16 accumulation 2 against 1, bf16 against fp32
  timeout        the process group `selfaug.dist.init` makes carries train.ddp_timeout (read back from the group)
  memory         torch.cuda.max_memory_allocated of the memory plan's lines against `selfaug estimate`'s terms
  measurements   stage 1 against a plain forward, and under `selfaug bench --only gpu` the step and packing:
                 timings, with no bound

Everything but attention runs at the Qwen2.5-7B shape with 4 layers, random weights, bf16 (`--smoke`: the
recipe's own model on this machine, the same code, the attention emulated; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from ..errors import SelfAugError
from .gpu_numerics import bound, check_accumulation, check_attention, check_bf16

CHECKS = ("attention", "accumulation", "bf16", "timeout", "memory")


class GpuCheckError(SelfAugError):
    pass


TIMEOUT_PROBE = """
import json, sys, torch, torch.distributed as tdist
from selfaug import dist
rank, world = dist.init(float(sys.argv[1]))  # selfaug's own process group, as every stage makes it
group = tdist.group.WORLD
backend = group._get_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
tdist.barrier()
print(json.dumps({"backend": tdist.get_backend(), "world": world,
                  "carried_s": backend.options._timeout.total_seconds()}))
"""


def check_timeout(timeout_s: float) -> dict:
    """2 ranks, each its own process, through `selfaug.dist.init` (NCCL on two GPUs; on one GPU or none, gloo:
    NCCL cannot put two ranks on one device): the timeout the world group carries, read back from the group."""
    from ..dist import free_port
    from torch.distributed import distributed_c10d
    nccl = torch.cuda.device_count() >= 2
    port = str(free_port())
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    if not nccl:
        env["CUDA_VISIBLE_DEVICES"] = ""
    procs = [subprocess.Popen([sys.executable, "-c", TIMEOUT_PROBE, str(timeout_s)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if procs[0].returncode != 0:
        return {"error": outs[0].strip()[-500:]}
    got = json.loads(outs[0].strip().splitlines()[-1])
    default = (distributed_c10d.default_pg_nccl_timeout if nccl else distributed_c10d.default_pg_timeout)
    default = default.total_seconds() if default is not None else None
    got.update(asked_s=timeout_s, torch_default_s=default,
               bounds={"carried_equals_asked": bound(got["carried_s"], timeout_s, "==")})
    if default == timeout_s:
        got["note"] = "train.ddp_timeout equals torch's default: the check cannot tell them apart"
    return got


def check_memory(cfg) -> dict:
    """The memory plan's lines measured (torch.cuda.max_memory_allocated), beside `selfaug estimate`'s terms."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: torch.cuda.max_memory_allocated is what it reads"}
    from peft import get_peft_model
    from ..estimate import _shape, memory
    from ..loss import selfaug_loss
    from ..head import decoder_and_head
    from ..models import load_model
    from ..train import lora_config
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(cfg.model, torch.bfloat16, device=device)
    weights = torch.cuda.memory_allocated() - base
    body, head = decoder_and_head(model)
    tokens = 4096
    ids = torch.randint(0, 1000, (1, tokens), device=device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        body(input_ids=ids, use_cache=False)
    stage1_forward = torch.cuda.max_memory_allocated() - before
    model.requires_grad_(False)
    model = get_peft_model(model, lora_config(cfg.train))
    body, head = decoder_and_head(model)
    saved = []
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    labels = torch.randint(0, 1000, (1, tokens), device=device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss, _, _ = selfaug_loss(hidden, head.weight, head.bias, labels, None, None, None, 1.0 / tokens, 0.0)
    loss.backward()
    step_peak = torch.cuda.max_memory_allocated() - before
    s = _shape(cfg.model, cfg.train)
    plan = memory(s, cfg.train, 2, 1, tokens, 2)
    del model, hidden, loss
    plan_saved = tokens * s["hidden"] * 2  # the hidden states alone: no head-sized buffer under LoRA
    return {"tokens": tokens, "weights_bytes": weights, "plan_weights_bytes": plan["weights"],
            "loss_saved_bytes": sum(saved), "plan_loss_saved_bytes": plan_saved,
            # measured beside the plan's terms, not bounded: the plan's activation factor is an estimate
            "stage1_forward_peak_bytes": stage1_forward, "lora_step_peak_bytes": step_peak,
            "plan_activations_bytes": plan["activations_without_checkpointing"],
            "plan_loss_buffers_bytes": plan["loss_buffers"],
            "bounds": {"weights_over_plan_minus_1": bound(abs(weights / plan["weights"] - 1), 0.05),
                       "loss_saved_over_plan": bound(sum(saved) / plan_saved, 1.10)}}


def verdict(out: dict, allow_emulated: bool) -> list[str]:
    """Every bound missed, every check that raised, and an emulated attention unless allowed: one line each."""
    failures = []
    for name in CHECKS:
        r = out.get(name, {})
        if "error" in r:
            failures.append(f"{name}: did not run: {r['error']}")
        for key, b in r.get("bounds", {}).items():
            if not b["passed"]:
                failures.append(f"{name}.{key}: {b['figure']:.4g} is not {b['rule']} {b['bound']:.4g}")
    if out.get("attention_kernel") == "emulated" and not allow_emulated:
        failures.append("attention: emulated (the flash-attn package is not installed, or no GPU): transformers' "
                        "flash_attention_2 was not tested; install flash-attn, or pass --allow-emulated")
    return failures


# --smoke on a CPU: attention's layouts on 4 examples (two multi-rows of 2), accumulation in fp32 (bf16 matmuls are
# slow on a CPU; tests/train/test_accumulation.py runs bf16 on every stage), bf16 against fp32 on 2 steps
SMOKE_ATTENTION = {"examples": 4}


def run(cfg_path: str, overrides: list[str], smoke: bool, step_fn=None, packing_fn=None,
        allow_emulated: bool = False) -> dict:
    """The whole GPU check (see the module docstring); `step_fn`, `packing_fn`: the bench's step and packing
    measurements (`selfaug bench --only gpu`; launch.sh gpu-check runs the bounded checks without them)."""
    from .. import precompute
    from ..config import load_config
    from .scale import SCALE
    from .worker import bench_precompute_and_storage
    if not torch.cuda.is_available() and not smoke:
        raise GpuCheckError("launch.sh gpu-check needs a CUDA GPU (this machine has none); --smoke runs the same "
                            "code on the recipe's model here")
    tmp = tempfile.mkdtemp(prefix="selfaug-gpu-check-")
    extra = [f"teacher.output_dir={tmp}/teacher", "teacher.overwrite=true", f"train.output_dir={tmp}/run",
             "train.resume=never"]
    if not smoke:
        shape = json.load(open(os.path.join(SCALE, "qwen2.5-7b", "config.json")))
        shape["num_hidden_layers"] = 4
        os.makedirs(f"{tmp}/model")
        json.dump(shape, open(f"{tmp}/model/config.json", "w"))
        extra += [f"model.name_or_path={tmp}/model", "model.init=random", "model.dtype=bfloat16",
                  "model.attn_implementation=sdpa", "data.builtin_train_size=64", "data.max_seq_len=2048",
                  "train.micro_batch_size=4", "train.deepspeed=ds_configs/zero2.json"]
    over = list(overrides) + extra
    cfg = load_config(cfg_path, over)
    t0 = time.perf_counter()
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "shape": cfg.model.name_or_path, "torch": torch.__version__, "allow_emulated": allow_emulated}
    measured = {}
    try:
        measured.update(bench_precompute_and_storage(cfg, True, False, n_examples=16 if smoke else 64))
        precompute.run(cfg)
        for name, fn in (("attention", lambda: check_attention(cfg_path, over, **SMOKE_ATTENTION if smoke else {})),
                         ("accumulation", lambda: check_accumulation(cfg_path, over, tmp,
                                                                     "float32" if smoke else "bfloat16")),
                         ("bf16", lambda: check_bf16(cfg_path, over, tmp, steps=2 if smoke else 3)),
                         ("timeout", lambda: check_timeout(cfg.train.ddp_timeout)),
                         ("memory", lambda: check_memory(cfg)),
                         ("step", step_fn and (lambda: step_fn(cfg_path, over, 2 if smoke else 5))),
                         ("packing", packing_fn and (lambda: packing_fn(cfg, cfg_path, over, 1 if smoke else 5)))):
            if fn is None:
                continue
            t = time.perf_counter()
            try:  # one check failing leaves the others' figures
                result = fn()
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on, the verdict fails it
                result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e) else ''}"}
            (out if name in CHECKS else measured)[name] = result
            out.setdefault("seconds_by_check", {})[name] = time.perf_counter() - t
            print(f"gpu-check {name}: {json.dumps(result, default=str)[:600]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["attention_kernel"] = out.get("attention", {}).get("attention_kernel", "not run")
    for name in CHECKS:  # the attention each check ran: only the attention check runs flash's
        out.get(name, {}).setdefault("attention_kernel", cfg.model.attn_implementation)
    out["measurements"] = measured
    out["failures"] = verdict(out, allow_emulated)
    out["passed"] = not out["failures"]
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    """`launch.sh gpu-check`: the checks, gpu_check.json, and exit status 1 when any bound is missed."""
    from .. import dist
    from ..config import load_config
    p = argparse.ArgumentParser(prog="python -m selfaug.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="recipes/smollm2_demo.yaml", help="recipe YAML")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="the recipe's model on this machine (CPU ok); implies "
                                                        "--allow-emulated; the figures mean nothing")
    p.add_argument("--allow-emulated", action="store_true", help="pass without the flash-attn package (the "
                                                                 "attention check then runs flash's contract in torch)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    load_config(args.config, args.overrides)  # a bad recipe is one line before any work
    dist.ensure_env()
    out = run(args.config, args.overrides, args.smoke, allow_emulated=args.allow_emulated or args.smoke)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": out}, f, indent=2)
    for name in CHECKS:
        for key, b in out.get(name, {}).get("bounds", {}).items():
            print(f"  {'ok  ' if b['passed'] else 'FAIL'} {name}.{key}: {b['figure']:.4g} {b['rule']} {b['bound']:.4g}")
    print(f"gpu-check: attention kernel {out['attention_kernel']}; {out['seconds']:.0f} s; {args.out}")
    if out["failures"]:
        print("gpu-check: FAILED:\n  " + "\n  ".join(out["failures"]), file=sys.stderr)
        return 1
    print("gpu-check: every bound holds")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SelfAugError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        sys.exit(2)
