"""`launch.sh gpu-check` / `selfaug bench --only gpu` (docs/design.md, "Benchmarks"): every check the GPU path
needs, on one GPU, in one short run (sized to fit a few minutes; not yet run on a GPU), figures to gpu_check.json
under $OUT:

  attention   packed = padded under flash-attention (flash_attention_2 when the flash-attn package is there,
              else a CUDA function with flash-attention's contract registered with transformers' AttentionInterface):
              loss, NLL, KL and gradients of the varlen layout against padding, and the multi-row layout shown wrong
  bf16        3 optimizer steps in bf16 (DeepSpeed's bf16 section, fp32 master weights) against fp32: finite, close
  timeout     the NCCL process group made with train.ddp_timeout carries it
  memory      torch.cuda.max_memory_allocated of the memory plan's lines against `selfaug estimate`'s formulas:
              the weights, the loss's saved tensors (no head buffer under LoRA), a stage-1 forward (no KV cache), the
              peak of a SelfAug step
  stage1, step, packing   stage 1 against a plain forward, the SelfAug step against vanilla LoRA, packing

At the Qwen2.5-7B shape with 4 layers, random weights (`--smoke`: the recipe's own model on this machine, the same
code, figures that mean nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

CONTRACT = "cuda_fa_contract"  # no "flash" in the name: transformers would look for a kernel by it


def _contract_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attention's contract with torch's sdpa (tests/helpers/cpu_flash.py is its CPU twin): varlen kwargs or
    one row of restarting position_ids -> each segment alone; otherwise plain causal attention over each row."""
    cu, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    B, T = query.shape[0], query.shape[2]

    def causal(q, k, v):
        k, v = (x.repeat_interleave(q.shape[0] // x.shape[0], 0) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1)

    def segments(bounds):
        return torch.cat([causal(query[0][:, a:b], key[0][:, a:b], value[0][:, a:b])
                          for a, b in zip(bounds[:-1], bounds[1:]) if b > a])[None]
    if cu is not None:
        return segments(cu.tolist()), None
    if pos is not None and B == 1:
        p = pos.reshape(-1)
        if not torch.equal(p, torch.arange(T, device=p.device) + p.min()):
            return segments((p == 0).nonzero().flatten().tolist() + [T]), None
    return torch.stack([causal(query[b], key[b], value[b]) for b in range(B)]), None


def check_attention(cfg) -> dict:
    """Packed (varlen) = padded under flash-attention's contract; the multi-row layout is not."""
    from transformers import AttentionInterface
    from transformers.utils import is_flash_attn_2_available
    from .. import store
    from ..models import attention_width, load_model
    from ..train import Objective
    from ..train.batches import PADDED, MaskedPacking, layout_for, to_device
    from ..train.sources import StoredSignal
    name = "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else CONTRACT
    if name == CONTRACT:
        AttentionInterface.register(CONTRACT, _contract_attention)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import dataclasses
    mc = dataclasses.replace(cfg.model, attn_implementation=name)
    model = load_model(mc, dtype, device=device)
    model.requires_grad_(True)
    source = StoredSignal(store.TeacherStore(cfg.teacher.output_dir))
    objective = Objective(model, cfg.train, source)
    rows = [source.examples.example(i) for i in range(min(4, len(source.examples)))]
    lens = [len(r["input_ids"]) for r in rows]
    n_nll = sum(n - r["prompt_len"] for n, r in zip(lens, rows))
    n_kl = sum(len(r["positions"]) for r in rows)
    head = model.get_output_embeddings().weight
    out = {"attention": name, "flash_attn_installed": name != CONTRACT}
    if name == CONTRACT and torch.cuda.is_available():
        out["note"] = "flash-attn is not installed: the contract function ran, real flash_attention_2 was not tested"
    layouts = {"padded": PADDED, "varlen": layout_for(name, True, 10 ** 6, attention_width(model.config)),
               "rows": MaskedPacking(2 * max(lens), 1e9)}
    got = {}
    for key, layout in layouts.items():
        batch = to_device(source.batch(rows, 0, layout), device)
        loss, nll, kl = objective(batch, 1.0 / n_nll, 0.5 / max(n_kl, 1))
        grad, = torch.autograd.grad(loss, [head])
        got[key] = (loss.item(), nll.item() / n_nll, kl.item() / max(n_kl, 1), grad.float())
    for key in ("varlen", "rows"):
        out[key] = {"loss_rel_diff": abs(got[key][0] - got["padded"][0]) / abs(got["padded"][0]),
                    "kl_abs_diff": abs(got[key][2] - got["padded"][2]),
                    "head_grad_rel_diff": ((got[key][3] - got["padded"][3]).norm() / got["padded"][3].norm()).item()}
    out["varlen_equals_padded"] = out["varlen"]["loss_rel_diff"] < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    out["rows_differ"] = out["rows"]["loss_rel_diff"] > 10 * out["varlen"]["loss_rel_diff"]
    del model, objective
    return out


def check_bf16(cfg_path: str, overrides: list[str], tmp: str) -> dict:
    """3 steps of selfaug train in bf16 and in fp32 from the same store: finite, the losses close."""
    from ..config import load_config
    from ..train import train
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(cfg_path, list(overrides) + [f"model.dtype={dtype}", "train.max_steps=3",
                                                       f"train.output_dir={tmp}/bf16-{dtype}", "train.resume=never"])
        out = train(cfg)
        rows[dtype] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(rows["float32"], rows["bfloat16"])]
    return {"losses": {k: [r["loss"] for r in v] for k, v in rows.items()}, "max_rel_diff": max(diffs),
            "finite": all(r["loss"] == r["loss"] for r in rows["bfloat16"])}


TIMEOUT_PROBE = """
import json, os, sys, torch, torch.distributed as tdist
from selfaug import dist
timeout = int(sys.argv[1])
rank, world = dist.init(timeout)  # selfaug's own process group, as each stage makes it
import deepspeed
from datetime import timedelta
deepspeed.init_distributed(dist_backend="nccl", timeout=timedelta(seconds=timeout))
tdist.barrier()
backend = tdist.group.WORLD._get_backend(torch.device("cuda"))
carried = getattr(getattr(backend, "options", None), "_timeout", None)
print(json.dumps({"asked_s": timeout, "carried_s": carried.total_seconds() if carried is not None else None,
                  "world": world}))
"""


def check_timeout(timeout_s: int) -> dict:
    """selfaug's process group on 2 ranks of one GPU's host (NCCL, each its own process: `dist.init` then
    `deepspeed.init_distributed`, as the stages make it): the timeout the default group carries."""
    import subprocess
    import sys
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from ..dist import free_port
    port, n = str(free_port()), 1 if torch.cuda.device_count() < 2 else 2
    procs = [subprocess.Popen([sys.executable, "-c", TIMEOUT_PROBE, str(timeout_s)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(n)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return json.loads(outs[0].strip().splitlines()[-1]) if procs[0].returncode == 0 else {"error": outs[0][-500:]}


def check_memory(cfg) -> dict:
    """The memory plan's lines measured (torch.cuda.max_memory_allocated), beside `selfaug estimate`'s terms."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from peft import get_peft_model
    from ..estimate import _shape, memory
    from ..loss import selfaug_loss
    from ..models import decoder_and_head, load_model
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
    return {"tokens": tokens, "weights_bytes": weights, "plan_weights_bytes": plan["weights"],
            "loss_saved_bytes": sum(saved), "plan_loss_saved_bytes": tokens * s["hidden"] * 2,
            "stage1_forward_peak_bytes": stage1_forward, "lora_step_peak_bytes": step_peak,
            "plan_activations_bytes": plan["activations_without_checkpointing"],
            "plan_loss_buffers_bytes": plan["loss_buffers"]}


def run(cfg_path: str, overrides: list[str], smoke: bool, step_fn, packing_fn) -> dict:
    """The whole GPU check (see the module docstring); `step_fn`, `packing_fn`: the bench's step and packing."""
    from .. import precompute
    from ..config import load_config
    from .scale import SCALE
    from .worker import bench_precompute_and_storage
    if not torch.cuda.is_available() and not smoke:
        raise RuntimeError("selfaug bench --only gpu needs a CUDA GPU (this machine has none); "
                           "--smoke runs the same code on the recipe's model here")
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
           "shape": cfg.model.name_or_path, "torch": torch.__version__}
    try:
        out.update(bench_precompute_and_storage(cfg, True, False, n_examples=16 if smoke else 64))
        precompute.run(cfg)
        for name, fn in (("attention", lambda: check_attention(cfg)),
                         ("bf16", lambda: check_bf16(cfg_path, over, tmp)),
                         ("timeout", lambda: check_timeout(cfg.train.ddp_timeout)),
                         ("memory", lambda: check_memory(cfg)),
                         ("step", lambda: step_fn(cfg_path, over, 2 if smoke else 5)),
                         ("packing", lambda: packing_fn(cfg, cfg_path, over, 1 if smoke else 5))):
            t = time.perf_counter()
            try:  # one check failing leaves the others' figures
                out[name] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"}
            out.setdefault("seconds_by_check", {})[name] = time.perf_counter() - t
            print(f"gpu-check {name}: {json.dumps(out[name], default=str)[:400]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t0
    return out
