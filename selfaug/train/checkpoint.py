"""Checkpoints and resume at any world size (docs/design.md, "Checkpoints and preemption").

A checkpoint `<output_dir>/checkpoints/step-N/` holds DeepSpeed's own files, each rank's RNG state, and
`selfaug.json` (the step, the batch geometry, what the run must match) plus, under ZeRO 1-3,
`portable.safetensors`: every trainable parameter's fp32 value and its optimizer state, whole, in
name order. `checkpoints/latest` names it only once every file of every rank is written (an atomic
rename on rank 0 after a barrier), so a run killed while saving resumes from the one before.

Resume (`train.resume`): at the checkpoint's world size DeepSpeed loads its own files; at another
world size with the same global batch (micro x accum x world), the portable state is loaded into the
freshly partitioned engine (DeepSpeed's `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`),
the lr scheduler and step counters are restored, and the sampler, which depends only on the global
batch, gives every step the same examples. Another global batch is refused in one line naming the
grad_accum that keeps it.

Preemption (a stop on a signal, exit 75) is `preemption.py`.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch

from .. import dist
from ..config import config_digest
from ..errors import SelfAugError

META = "selfaug.json"
PORTABLE = "portable.safetensors"


class CheckpointError(SelfAugError, RuntimeError):
    """A checkpoint that cannot be resumed by this run (the message says why and what to do)."""


# ---- what a run must match -----------------------------------------------------------------------

def run_identity(cfg, store_settings: dict | None) -> dict:
    """What a checkpoint's run and this run must share to continue it: the model, the method and its
    shape, the teacher and the data. (The world size, micro batch and grad_accum may change.)"""
    t = cfg.train
    return {"model": cfg.model.name_or_path, "model_init": cfg.model.init, "method": t.method,
            "lora": [t.lora_r, t.lora_alpha, t.lora_target_modules] if t.method == "lora" else None,
            "freeze_lm_head": t.freeze_lm_head, "teacher_mode": t.teacher_mode, "optimizer": t.optimizer,
            "store": config_digest(store_settings) if store_settings else None,
            "data": cfg.data.train, "seed": t.seed,
            "drift_budget": [t.drift_budget, t.drift_horizon, t.alpha_min, t.alpha_max] if t.drift_budget else None}


# ---- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the portable trainable state -----------------------------------------------------------------

def _trainable(engine) -> list:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _inner_optimizer(engine):
    """The torch optimizer that holds the (flat, partitioned) fp32 state under ZeRO 1-3."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _state_keys(engine) -> tuple[list[str], dict]:
    """(tensor state keys, scalar state values) of the optimizer, e.g. (['exp_avg', 'exp_avg_sq'], {'step': 3})."""
    tensors, scalars = [], {}
    for state in _inner_optimizer(engine).state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors.append(key)
            elif value is not None:
                scalars[key] = float(value)
        break
    return tensors, scalars


def save_portable(engine, path: str) -> dict:
    """All ranks (the gathers are collectives): each trainable parameter's fp32 value and optimizer state,
    whole, written by rank 0 to `path`. Returns the scalar optimizer state and the keys, for the meta."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    keys, scalars = _state_keys(engine)
    rank = dist.rank_world()[0]
    tensors = {}
    for name, p in _trainable(engine):
        value = safe_get_full_fp32_param(p)
        states = {key: safe_get_full_optimizer_state(p, key) for key in keys}
        if rank == 0:
            tensors[f"param/{name}"] = value.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                            else p.shape).contiguous()
            for key, v in states.items():
                tensors[f"{key}/{name}"] = v.detach().float().cpu().reshape(tensors[f"param/{name}"].shape).contiguous()
    if rank == 0:
        from safetensors.torch import save_file
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
    return {"state_keys": keys, "scalars": scalars}


def load_portable(engine, path: str, meta: dict) -> None:
    """Every rank: the portable state into this (differently partitioned) engine."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open
    inner = _inner_optimizer(engine)
    keys, scalars = meta["state_keys"], meta["scalars"]
    for group in inner.param_groups:  # the optimizer's state exists only after a first step: create it
        for flat in group["params"]:
            state = inner.state[flat]
            for key in keys:
                state.setdefault(key, torch.zeros_like(flat))
            for key, value in scalars.items():
                state[key] = torch.tensor(value) if key == "step" else value
    with safe_open(path, framework="pt") as f:
        names = {k.split("/", 1)[1] for k in f.keys() if k.startswith("param/")}
        trainable = _trainable(engine)
        if names != {n for n, _ in trainable}:
            missing = sorted({n for n, _ in trainable} - names)[:3]
            raise CheckpointError(f"{path} holds other trainable parameters than this run (e.g. {missing}); "
                                  "resume with the recipe that wrote it, or train.resume=never")
        for name, p in trainable:
            value = f.get_tensor(f"param/{name}").to(p.device)
            if hasattr(p, "ds_id"):  # ZeRO-3: the module's partitions, through a gather written by rank 0
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if dist.rank_world()[0] == 0:
                        p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
            safe_set_full_fp32_param(p, value)
            for key in keys:
                safe_set_full_optimizer_state(p, f.get_tensor(f"{key}/{name}").to(p.device), key)


# ---- save and resume ------------------------------------------------------------------------------

def save(run, step: int, identity: dict) -> tuple[str, float]:
    """All ranks: the checkpoint of `step`, marked latest once whole, and the seconds it took. A write that
    fails on any rank (a full disk, a file-size limit) is one CheckpointError on every rank, and `latest`
    still names the one before."""
    engine, cfg = run.engine, run.cfg
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    tag = f"step-{step}"
    path = os.path.join(root, tag)
    t0 = time.time()
    failure = None
    try:
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(rng_state(), os.path.join(path, f"rng_rank{run.rank}.pt"))
        portable = save_portable(engine, os.path.join(path, PORTABLE)) if engine.zero_optimization_stage() > 0 else None
        if run.rank == 0:  # the meta last, whole or absent: a checkpoint without it is never resumed
            t = cfg.train
            meta = {"step": step, "world_size": run.world, "micro_batch_size": t.micro_batch_size,
                    "grad_accum": t.grad_accum, "global_batch": t.micro_batch_size * t.grad_accum * run.world,
                    "zero_stage": engine.zero_optimization_stage(), "identity": identity, "portable": portable,
                    "alpha_control": run.alpha.state_dict(),
                    "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
            with open(os.path.join(path, META + ".tmp"), "w") as f:
                json.dump(meta, f, indent=2, default=str)
            os.replace(os.path.join(path, META + ".tmp"), os.path.join(path, META))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        failure = e
    failed = dist.all_reduce_sum([failure is not None])[0]  # every rank's files are written, or none is latest
    if failed:
        latest = find(cfg) if cfg.train.resume == "auto" else None
        why = _why_not_written(failure, root)
        raise CheckpointError(f"the checkpoint of step {step} could not be written under {path} ({why}); "
                              f"checkpoints/latest still names {latest or 'no checkpoint'}: free space (or raise the "
                              "file-size limit) and run the same command again to resume from it")
    if run.rank == 0:
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    seconds = time.time() - t0
    if run.rank == 0:
        print(f"checkpoint {path} written in {seconds:.1f} s", flush=True)
    dist.barrier()
    return path, seconds


def _why_not_written(failure, root: str) -> str:
    """The cause of a failed checkpoint write in words (torch.save reports a full disk or a file-size limit
    as an unhelpful '[enforce fail at inline_container.cc]')."""
    import resource
    import shutil
    if failure is None:
        return "a write failed on another rank"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"File too large: the file-size limit (ulimit -f) is {limit} bytes; {str(failure).splitlines()[0]}"
    free = shutil.disk_usage(root).free
    if free < 1 << 30:
        return f"No space left on device? {free / 1e6:.0f} MB free; {str(failure).splitlines()[0]}"
    return str(failure).splitlines()[0]


def find(cfg) -> str | None:
    """The checkpoint directory to resume from (train.resume: auto | never | DIR), or None."""
    t = cfg.train
    if t.resume == "never":
        return None
    if t.resume != "auto":
        return t.resume
    latest = os.path.join(t.output_dir, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return os.path.join(t.output_dir, "checkpoints", f.read().strip())


def read_meta(path: str, cfg, world: int, identity: dict) -> dict:
    """The checkpoint's meta, checked against this run: one CheckpointError line for each way it cannot
    be continued here."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a selfaug checkpoint (no {META}, or it was not finished); pass "
                              "train.resume=never to start afresh, or train.resume=DIR with a finished one")
    with open(meta_path) as f:
        meta = json.load(f)
    diff = [f"{k} (checkpoint: {meta['identity'].get(k)!r}, recipe: {v!r})" for k, v in identity.items()
            if meta["identity"].get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} was written by another recipe: " + "; ".join(diff)
                              + ". Resume with that recipe, or pass train.resume=never (or another output_dir)")
    t = cfg.train
    want, have = meta["global_batch"], t.micro_batch_size * t.grad_accum * world
    if want != have:
        per = t.micro_batch_size * world
        fix = (f"train.grad_accum={want // per} keeps it" if want % per == 0 else
               f"no grad_accum keeps it with micro_batch_size={t.micro_batch_size}: choose micro_batch_size x "
               f"grad_accum = {want / world:g} per rank")
        raise CheckpointError(f"checkpoint {path} has a global batch of {want} (micro {meta['micro_batch_size']} x "
                              f"accum {meta['grad_accum']} x {meta['world_size']} ranks); this run has {have} "
                              f"(micro {t.micro_batch_size} x accum {t.grad_accum} x {world} ranks): {fix}")
    return meta


def resume(run, identity: dict) -> int:
    """All ranks: the optimizer step to start from (0, or the checkpoint's), the engine restored."""
    path = find(run.cfg)
    if path is None:
        return 0
    meta = read_meta(path, run.cfg, run.world, identity)
    if run.cfg.train.drift_budget is not None:
        run.alpha.load_state_dict(meta.get("alpha_control"))  # the same alpha trajectory, at any world size
    engine = run.engine
    if meta["world_size"] == run.world or meta["zero_stage"] == 0:
        loaded, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}; pass train.resume=never")
    else:
        load_portable(engine, os.path.join(path, PORTABLE), meta["portable"])
        if meta["lr_scheduler"] is not None:
            sched = engine.lr_scheduler
            sched.load_state_dict(meta["lr_scheduler"])
            for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
                group["lr"] = lr  # load_state_dict leaves the optimizer at the initial lr until its next step
        engine.global_steps, engine.global_samples = meta["step"], meta["step"] * meta["global_batch"]
        engine.micro_steps = meta["step"] * engine.gradient_accumulation_steps()
    rng = os.path.join(path, f"rng_rank{run.rank % meta['world_size']}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    if run.rank == 0:
        how = "" if meta["world_size"] == run.world else f" (written on {meta['world_size']} ranks, now {run.world})"
        print(f"resumed from {path} at step {meta['step']}{how}", flush=True)
    return int(meta["step"])
