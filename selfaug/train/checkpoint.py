"""Checkpoints and resume at any world size (docs/design.md, "Checkpoints and preemption"; docs/checkpoints.md).

A checkpoint `<output_dir>/checkpoints/step-N/` holds DeepSpeed's own files, each rank's RNG state and
`selfaug.json` (the step, the batch geometry, what the run must match). Under ZeRO 1-3 every rank writes
its own partition of the fp32 weights and of the optimizer state, and nothing else of them: no rank
gathers, holds or writes another's; frozen parameters (a LoRA base, a frozen head) are not written, the
run re-creates them. `checkpoints/latest` names a checkpoint only once every rank has written and flushed its
files (an atomic rename on rank 0 after a vote), so a run killed while saving resumes from the one before.

Resume (`train.resume`): at the checkpoint's world size (or under ZeRO-0) DeepSpeed loads its own files.
At another world size with the same global batch (micro x accum x world) the checkpoint is converted
once, by all ranks together, into DeepSpeed's universal checkpoint (`step-N/universal/`: each
parameter's full fp32 value and optimizer state in files of its own) and loaded with
`checkpoint.load_universal`, each rank reading one parameter at a time and keeping its new partition;
the sampler, which depends only on the global batch, gives every step the same examples. Another global
batch is refused in one line naming the gradient_accumulation_steps that keeps it. Preemption is `preemption.py`.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import time
import types

import numpy as np
import torch

from .. import dist
from ..config import config_digest
from ..durable import fsync_tree, write_atomic
from ..errors import SelfAugError
from ..hashing import changed_files
from ..models import model_fingerprint

META = "selfaug.json"
UNIVERSAL = "universal"  # step-N/universal/: the checkpoint in DeepSpeed's universal form, written at need


class CheckpointError(SelfAugError, RuntimeError):
    """A checkpoint that cannot be resumed by this run (the message says why and what to do)."""


# ---- what a run must match -----------------------------------------------------------------------

def run_identity(cfg, store_settings: dict | None) -> dict:
    """What a checkpoint's run and this run must share to continue it: the model, the method and its
    shape, the teacher and the data. (World size, micro batch and accumulation may change; by shards not the world.)"""
    t, weights = cfg.train, model_fingerprint(cfg.model)  # a LoRA base or frozen head changed in place is refused
    return {"model": cfg.model.name_or_path, "model_hash": weights["content_hash"], "model_files": weights.get("files"),
            "model_init": cfg.model.init, "method": "lora" if t.adapter == "lora" else "full",
            "lora": [t.lora_r, t.lora_alpha, t.lora_target_modules] if t.adapter == "lora" else None,
            "freeze_lm_head": t.freeze_lm_head, "teacher_mode": t.teacher_mode, "optimizer": {"adamw_torch": "adamw"}.get(t.optim, t.optim),
            "store": config_digest(store_settings) if store_settings else None,
            "data": cfg.data.train, "seed": t.seed,
            "drift_budget": [t.drift_budget, t.drift_horizon, t.alpha_min, t.alpha_max] if t.drift_budget else None,
            "order": [t.order, dist.rank_world()[1]] if t.order != "global" else None}


# ---- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (read back with weights_only=True), CUDA's for each
    visible device by index."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss], "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached], "cuda": cuda}


def set_rng_state(state: dict, cuda_devices: int) -> None:
    """The states of `rng_state`, CUDA's for the `cuda_devices` devices this process sees; one line for those saved
    for devices it does not see (a resume on a machine, or with CUDA_VISIBLE_DEVICES, showing fewer GPUs)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for i, cuda in enumerate(state["cuda"][:cuda_devices]):
        torch.cuda.set_rng_state(cuda, i)
    if len(state["cuda"]) > cuda_devices:
        print(f"selfaug: the checkpoint holds the CUDA RNG states of {len(state['cuda'])} devices and this process "
              f"sees {cuda_devices}: those of devices {cuda_devices}-{len(state['cuda']) - 1} are not restored", flush=True)


# ---- save and resume ------------------------------------------------------------------------------

def save(run, step: int, identity: dict, extra=None) -> tuple[str, float]:
    """All ranks: the checkpoint of `step`, marked latest once whole, and the seconds it took. Each rank writes its
    own partition of the trainable state and no more; `extra(path)`, on all ranks, writes more into it. A write that
    fails on any rank (a full disk, a file-size limit) is one CheckpointError on every rank, and `latest` still names
    the one before."""
    engine, cfg = run.engine, run.cfg
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    tag = f"step-{step}"
    path = os.path.join(root, tag)
    t0 = time.time()
    failure, in_deepspeed = None, True
    try:
        # each rank its own partition (ZeRO 1-3); frozen parameters are the model's as loaded: not written
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
        in_deepspeed = False
        torch.save(rng_state(), rng := os.path.join(path, f"rng_rank{run.rank}.pt"))
        # on disk before `latest` names it: each rank flushes what it wrote (its own cache), rank 0 the shared files
        fsync_tree(path, lambda n: f"pp_rank_{run.rank}_" in n or n == os.path.basename(rng) or (
            run.rank == 0 and "pp_rank_" not in n and not n.startswith("rng_rank")))
        if extra is not None:  # e.g. the Hugging Face form (train.save_hf): inside the checkpoint before `latest`
            extra(path)  # rank 0 writes and flushes hf/ (no other rank walks it meanwhile)
        if run.rank == 0:  # the meta last, whole or absent: a checkpoint without it is never resumed
            t = cfg.train
            meta = {"step": step, "world_size": run.world, "micro_batch_size": t.micro_batch_size,
                    "grad_accum": t.gradient_accumulation_steps,
                    "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * run.world,
                    "zero_stage": engine.zero_optimization_stage(), "identity": identity,
                    "alpha_control": run.alpha.state_dict(),
                    "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}
            write_atomic(os.path.join(path, META), json.dumps(meta, indent=2, default=str))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        failure = e
        if in_deepspeed:  # DeepSpeed's save ends in a barrier the ranks whose writes went through are waiting at:
            dist.barrier()  # meet them there, or the failure vote below would pair with it and hang until the timeout
    failed = dist.all_reduce_sum([failure is not None])[0]  # every rank's files are written, or none is latest
    if failed:
        latest = find(cfg) if cfg.train.resume == "auto" else None
        why = _why_not_written(failure, root)
        raise CheckpointError(f"the checkpoint of step {step} could not be written under {path} ({why}); "
                              f"checkpoints/latest still names {latest or 'no checkpoint'}: free space (or raise the "
                              "file-size limit) and run the same command again to resume from it")
    if run.rank == 0:
        write_atomic(os.path.join(root, "latest"), tag)  # fsynced with its directory: it survives a power loss
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
    root = os.path.join(t.output_dir, "checkpoints")
    if not os.path.exists(os.path.join(root, "latest")):
        return None
    with open(os.path.join(root, "latest")) as f:
        tag = f.read().strip()
    path = os.path.join(root, tag)  # a tag names a checkpoint inside checkpoints/, never a path elsewhere
    if "/" in tag or tag in ("", ".", "..") or os.path.islink(path) or not os.path.isdir(path):
        raise CheckpointError(f"{root}/latest names {tag[:100]!r}, which is not a checkpoint directory inside {root}: "
                              "write the name of one there (step-N) into it, or pass train.resume=DIR")
    return path


def check_fresh(cfg) -> None:
    """Rank 0: train.resume=never over a directory that holds a run (a checkpoint, final/) is refused unless
    train.overwrite names the intent; with it, `latest` goes, so that a crash before the new run's first
    checkpoint cannot resume the old run."""
    t = cfg.train
    root = os.path.join(t.output_dir, "checkpoints")
    found = [p for p in (os.path.join(root, "latest"), os.path.join(t.output_dir, "final")) if os.path.exists(p)]
    if t.resume != "never" or not (found or os.path.isdir(root) and os.listdir(root)):
        return
    if not t.overwrite:
        raise CheckpointError(f"{t.output_dir} holds a run ({', '.join(found) or root}) and train.resume=never "
                              "would start another over it: pass train.overwrite=true as well to replace it, "
                              "train.resume=auto to continue it, or choose another train.output_dir")
    if os.path.exists(os.path.join(root, "latest")):
        os.remove(os.path.join(root, "latest"))


def read_meta(path: str, cfg, world: int, identity: dict) -> dict:
    """The checkpoint's meta, checked against this run: one CheckpointError line for each way it cannot
    be continued here."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a selfaug checkpoint (no {META}, or it was not finished); pass "
                              "train.resume=never train.overwrite=true to start afresh, or train.resume=DIR with a finished one")
    with open(meta_path) as f:
        meta = json.load(f)
    old = meta["identity"]
    diff = [f"{k} ({changed_files(old.get(k), v)})" if isinstance(v, dict) else
            f"{k} (checkpoint: {old.get(k)!r}, recipe: {v!r})" for k, v in identity.items() if old.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} was written by another recipe: " + "; ".join(diff)
                              + ". Resume with that recipe, or pass train.resume=never train.overwrite=true (or another output_dir)")
    t = cfg.train
    want, have = meta["global_batch"], t.micro_batch_size * t.gradient_accumulation_steps * world
    if want != have:
        per = t.micro_batch_size * world
        fix = (f"train.gradient_accumulation_steps={want // per} keeps it" if want % per == 0 else
               f"no gradient_accumulation_steps keeps it with micro_batch_size={t.micro_batch_size}: choose micro_batch_size x "
               f"gradient_accumulation_steps = {want / world:g} per rank")
        raise CheckpointError(f"checkpoint {path} has a global batch of {want} (micro {meta['micro_batch_size']} x "
                              f"accum {meta['grad_accum']} x {meta['world_size']} ranks); this run has {have} "
                              f"(micro {t.micro_batch_size} x accum {t.gradient_accumulation_steps} x {world} ranks): {fix}")
    return meta


# ---- resume at another world size: DeepSpeed's universal checkpoint --------------------------------
#
# The files are DeepSpeed's universal layout (`universal/zero/<parameter>/{fp32,exp_avg,...}.pt`, each the
# parameter's full value, `zero/optimizer_state.pt`, the model-states files beside), read by DeepSpeed's
# own loader. They are written here, not by deepspeed/checkpoint/ds_to_universal.py, whose functions do
# not fit this setup in DeepSpeed 0.19: `extract_zero_shards` / `extract_zero_shards_stage3` /
# `merge_zero3_slices` read exactly Adam's `exp_avg` and `exp_avg_sq` (SGD keeps no state: KeyError),
# `main` refuses a ZeRO-1/2 checkpoint without Megatron's `universal_checkpoint_info`, and each worker
# loads an old rank's whole file. Here the ranks share the parameters (the largest first, to the rank
# with the fewest values so far) and each writes its own, one tensor at a time, reading only their pieces
# of the old files (memory-mapped).


def ds_config_for_resume(conf: dict, cfg, world: int) -> dict:
    """The engine's config (`loop.ds_config`) with `checkpoint.load_universal` set when the run resumes
    a ZeRO 1-3 checkpoint written at another world size: DeepSpeed reads the flag at load time, from the
    config it was created with. Called before `deepspeed.initialize`, on every rank (rank 0 reads)."""
    path = find(cfg)
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if path is None or stage == 0:
        return conf

    def written_on():
        if not os.path.isfile(os.path.join(path, META)):
            return None
        with open(os.path.join(path, META)) as f:
            return json.load(f)["world_size"]
    old = dist.decide(written_on)  # an unfinished checkpoint: resume() names it
    if old in (None, world):
        return conf
    return {**conf, "checkpoint": {**conf.get("checkpoint", {}), "load_universal": True}}


class _Shard:
    """One old rank's optimizer file, memory-mapped (a piece is read when asked for): where each trainable
    parameter's piece lies in the rank's flat groups, and the groups' tensors (fp32 and the optimizer's)."""

    def __init__(self, path: str, dp_rank: int, dp_world: int, shapes: list[dict]):
        from deepspeed.checkpoint import (BASE_OPTIMIZER_STATE, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT,
                                          PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
        from deepspeed.checkpoint.ds_to_universal import _zero_partitioned_param_info
        # DeepSpeed's own file: it pickles its objects (fragment addresses, the loss scaler), and its
        # engine.load_checkpoint unpickles the same files (weights_only=False) at every resume anyway
        self.sd = sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]
        if FP32_FLAT_GROUPS in sd:  # ZeRO-3: each parameter padded to a multiple of the world, rank r's slice
            flats, self.inner = sd[FP32_FLAT_GROUPS], sd[OPTIMIZER_STATE_DICT]
            self.pieces = {}
            for g, group in enumerate(shapes):
                offset = 0
                for name, shape in group.items():
                    numel = math.prod(shape)
                    part, _ = _zero_partitioned_param_info(numel, dp_world)
                    self.pieces[name] = (g, offset, max(0, min(part, numel - dp_rank * part)))
                    offset += part
        else:  # ZeRO-1/2: the fragments DeepSpeed recorded
            flats, self.inner = sd[SINGLE_PARTITION_OF_FP32_GROUPS], sd[BASE_OPTIMIZER_STATE]
            self.pieces = {name: (g, a.start, a.numel) for g, m in enumerate(sd[PARAM_SLICE_MAPPINGS])
                           for name, a in m.items()}
        states = self.inner["state"]
        self.groups = [{"fp32": flat, **{k: v for k, v in states.get(g, {}).items() if torch.is_tensor(v) and v.dim()}}
                       for g, flat in enumerate(flats)]
        self.step = next((s["step"] for s in states.values() if "step" in s), None)  # Adam's; SGD has none

    def piece(self, name: str, key: str) -> torch.Tensor:
        g, start, numel = self.pieces[name]
        return self.groups[g][key].narrow(0, start, numel)

    def optimizer_state(self) -> dict:
        """`zero/optimizer_state.pt`: the global state and the param groups, the step of any state."""
        from deepspeed.checkpoint import (BASE_OPTIMIZER_STATE, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_GROUPS,
                                          PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
        sharded = {BASE_OPTIMIZER_STATE, SINGLE_PARTITION_OF_FP32_GROUPS, PARAM_SLICE_MAPPINGS, FP32_FLAT_GROUPS,
                   OPTIMIZER_STATE_DICT}
        scalars = {0: {"step": self.step}} if self.step is not None else {}
        return {**{k: v for k, v in self.sd.items() if k not in sharded}, PARAM_GROUPS: self.inner["param_groups"],
                OPTIMIZER_STATE_DICT: {"state": scalars, "param_groups": self.inner["param_groups"]}}


def _write_universal(path: str, out: str, rank: int, world: int) -> None:
    """This rank's share of the universal form of checkpoint `path` under `out`."""
    from deepspeed.checkpoint import PARAM, PARAM_SHAPES
    from deepspeed.checkpoint.ds_to_universal import _build_zero3_rank_grid, _get_model_state_files, _get_optim_files
    grid, _, old_world = _build_zero3_rank_grid(_get_optim_files(path))  # [tensor-parallel rank][data-parallel rank]
    model_files = _get_model_state_files(path)
    shapes = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)[PARAM_SHAPES]  # as _Shard
    shards = [_Shard(f, r, old_world, shapes) for r, f in enumerate(grid[0])]
    load, mine = [0] * world, []
    for name, shape in sorted(((n, s) for group in shapes for n, s in group.items()), key=lambda x: -math.prod(x[1])):
        r = load.index(min(load))  # the largest parameter first, to the rank with the least so far
        load[r] += math.prod(shape)
        if r == rank:
            mine.append((name, shape))
    for name, shape in mine:
        folder = os.path.join(out, "zero", name)
        os.makedirs(folder, exist_ok=True)
        for key in shards[0].groups[0]:  # one parameter's full value of one key at a time
            full = torch.cat([s.piece(name, key) for s in shards if name in s.pieces])
            if full.numel() != math.prod(shape):
                raise CheckpointError(f"{path}: the pieces of {name} hold {full.numel()} values, not {tuple(shape)}")
            torch.save({PARAM: full.view(shape)}, os.path.join(folder, f"{key}.pt"))
        if shards[0].step is not None:  # DeepSpeed's ZeRO-1/2 loader reads each parameter's step
            torch.save(shards[0].step, os.path.join(folder, "step.pt"))
    if rank == 0:
        torch.save(shards[0].optimizer_state(), os.path.join(out, "zero", "optimizer_state.pt"))
        for f in model_files:  # the lr scheduler, the step counters: DeepSpeed reads them from here
            target = os.path.join(out, os.path.basename(f))
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def universal(path: str) -> tuple[str, float]:
    """All ranks: `path`/universal, the universal form of checkpoint `path` (written by all ranks together,
    or found from an earlier resume), and the seconds it took. Renamed into place once whole."""
    target = os.path.join(path, UNIVERSAL)
    t0 = time.time()
    if dist.decide(lambda: os.path.isdir(target)):
        return target, 0.0
    rank, world = dist.rank_world()
    tmp = target + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a conversion that was killed
        os.makedirs(os.path.join(tmp, "zero"))
    dist.barrier()
    failure = None
    try:
        _write_universal(path, tmp, rank, world)
    except (OSError, RuntimeError) as e:
        failure = e
    if dist.all_reduce_sum([failure is not None])[0]:
        raise CheckpointError(f"the universal form of {path} could not be written under {tmp} "
                              f"({_why_not_written(failure, path)}): free space and run the same command again")
    if rank == 0:
        os.replace(tmp, target)
    dist.barrier()
    return target, time.time() - t0


def _partition(folder: str, key: str, rank: int, world: int) -> torch.Tensor:
    """This rank's ZeRO-3 partition of one parameter's universal file `key`.pt, padded as ZeRO-3 pads it;
    the file is memory-mapped, so only the partition is read."""
    from deepspeed.checkpoint import PARAM
    value = torch.load(os.path.join(folder, f"{key}.pt"), map_location="cpu", mmap=True, weights_only=True)
    flat = (value[PARAM] if isinstance(value, dict) else value).view(-1)
    part = math.ceil(flat.numel() / world)
    piece = flat[rank * part:(rank + 1) * part]
    out = torch.zeros(part, dtype=flat.dtype)  # (part,): the last rank's ends in padding
    out[:piece.numel()].copy_(piece)
    return out


def _load_zero3_universal(self, checkpoint_dir: str) -> None:
    """DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 for any torch
    optimizer, bound to the engine's optimizer. DeepSpeed 0.19's reads exactly `fp32`, `exp_avg` and
    `exp_avg_sq` and the step of `state[0]` (Adam's), so SGD's state (the fp32 value alone, no step) fails
    with FileNotFoundError; and each rank reads every parameter's files whole (`load_hp_checkpoint_state`),
    the whole state per rank. The same steps, over the keys the universal checkpoint holds, each rank
    reading its partitions only (no NVMe swapping, no tensor or expert parallelism: selfaug has neither)."""
    from deepspeed.checkpoint import OPTIMIZER_STATE_DICT
    zero_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), weights_only=False)  # DeepSpeed's, as _Shard
    self._load_global_state_stage3(optim_sd)
    inner = optim_sd[OPTIMIZER_STATE_DICT]
    scalars, param_groups = inner["state"].get(0, {}), inner["param_groups"]  # the step (Adam's), lr and the rest
    first = os.path.join(zero_dir, self.param_names[self.fp16_groups[0][0]])
    keys = [f[:-3] for f in sorted(os.listdir(first)) if f.endswith(".pt") and f != "step.pt"]
    for g, params in enumerate(self.fp16_groups):
        fp32 = self.fp32_partitioned_groups_flat[g]
        for key in keys:
            flat, offset = torch.zeros_like(fp32), 0
            for p in params:  # one parameter at a time
                part = _partition(os.path.join(zero_dir, self.param_names[p]), key, self._get_param_partition_rank(p),
                                  self._get_param_partition_world_size(p))
                flat.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if key == "fp32":
                fp32.data.copy_(flat)
            else:
                self.optimizer.state[fp32][key] = flat
        self.optimizer.state[fp32].update(scalars)
        if fp32.numel() > 0:
            self.fp16_partitioned_groups_flat[g].data.copy_(fp32.data)
        updated = self.unflatten(self.fp16_partitioned_groups_flat[g], self.fp16_partitioned_groups[g])
        for partitioned, q in zip(self.fp16_partitioned_groups[g], updated):
            partitioned.data = q.data
    for group in self.optimizer.param_groups:
        group.update({k: v for k, v in param_groups[0].items() if k != "params"})


def resume(run, identity: dict) -> int:
    """All ranks: the optimizer step to start from (0, or the checkpoint's), the engine restored."""
    path = find(run.cfg)
    if path is None:
        return 0
    meta = read_meta(path, run.cfg, run.world, identity)
    if run.cfg.train.drift_budget is not None:
        run.alpha.load_state_dict(meta.get("alpha_control"))  # the same alpha trajectory, at any world size
    engine = run.engine
    how = ""
    if engine.load_universal_checkpoint():  # another world size under ZeRO 1-3 (ds_config_for_resume)
        _, seconds = universal(path)
        if engine.zero_optimization_stage() == 3:
            engine.optimizer.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = types.MethodType(
                _load_zero3_universal, engine.optimizer)
        loaded, _ = engine.load_checkpoint(path, tag=UNIVERSAL, load_module_strict=False)  # frozen: not saved
        how = f" (written on {meta['world_size']} ranks, now {run.world}: universal form in {seconds:.1f} s)"
    else:  # DeepSpeed's own files: the same world size, or ZeRO-0 (whole on every rank)
        loaded, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                           load_module_strict=False)  # frozen parameters are not in it
        if meta["world_size"] != run.world:
            how = f" (written on {meta['world_size']} ranks, now {run.world})"
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}; pass train.resume=never "
                              "train.overwrite=true")
    rng = os.path.join(path, f"rng_rank{run.rank % meta['world_size']}.pt")
    try:  # tensors and plain values: nothing of the run's own files is unpickled
        state = torch.load(rng, weights_only=True) if os.path.exists(rng) else None
    except pickle.UnpicklingError:
        state = print(f"selfaug: {rng} holds more than tensors and plain values (an older selfaug's): not read, the "
                      "RNG state is not restored", flush=True)
    if state is not None:
        set_rng_state(state, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if run.rank == 0:
        print(f"resumed from {path} at step {meta['step']}{how}", flush=True)
    return int(meta["step"])
