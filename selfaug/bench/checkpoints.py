"""`selfaug bench --only checkpoint` (docs/design.md, "Benchmarks"; docs/checkpoints.md): what one checkpoint
costs each rank. A random
Llama at the Llama-3-8B width (recipes/scale/llama3-8b/config.json cut to SHAPE: one layer, the built-in
tokenizer's vocabulary, a tied head; 4 CPU ranks hold it with its AdamW state), full fine-tuning with
AdamW under ZeRO-3, one optimizer step, then `checkpoint.save`, on 1, 2 and 4 ranks; then the 4-rank
checkpoint resumed on 2 ranks (its universal form written, then loaded). Each rank counts (`SaveCounter`)
the tensor bytes it serializes (torch.save, safetensors' save_file: each storage once per call) and
gathers whole (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`), the bytes of the files it
writes, the growth of its resident memory, and the seconds. `--smoke`: the built-in tiny Llama on one rank, in this
process (the same code).

One rank of a measurement: python -m selfaug.bench.checkpoints {save|resume} RECIPE (writes rank{R}.json
to $SELFAUG_BENCH_OUT).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from .. import dist
from .scale import ROOT, SCALE, _base

# on recipes/scale/llama3-8b: one layer, and the vocabulary of the built-in data's tokenizer (SmolLM2's
# 49,152 tokens, the least a random model may have) with the head tied to it: 0.42 B parameters
SHAPE = {"num_hidden_layers": 1, "vocab_size": 49152, "tie_word_embeddings": True}
WORLDS = (1, 2, 4)
GLOBAL_BATCH = 4  # micro 1 x grad_accum 4 / world: every world size can resume every other's checkpoint


def _storages(obj, seen: dict) -> None:
    """The tensor storages in a (nested) object, by address: what torch.save serializes."""
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, dict):
        for value in obj.values():
            _storages(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _storages(value, seen)


class SaveCounter:
    """While active, counts in this process: the tensor bytes serialized by torch.save and safetensors'
    save_file (each storage once per call), the bytes of the files they write, and the bytes gathered
    whole by DeepSpeed's safe_get_full_fp32_param / safe_get_full_optimizer_state (the old portable
    save's gather)."""

    def __init__(self):
        self.tensor_bytes = self.file_bytes = self.files = self.gathered_bytes = 0

    def _count_save(self, save):
        def counted(obj, f, *args, **kwargs):
            seen = {}
            _storages(obj, seen)
            out = save(obj, f, *args, **kwargs)
            self.tensor_bytes += sum(seen.values())
            if isinstance(f, (str, os.PathLike)):
                self.files += 1
                self.file_bytes += os.path.getsize(f)
            return out
        return counted

    def _count_gather(self, gather):
        def counted(*args, **kwargs):
            value = gather(*args, **kwargs)
            self.gathered_bytes += value.numel() * value.element_size() if value is not None else 0
            return value
        return counted

    def __enter__(self):
        import deepspeed.utils
        import safetensors.torch
        gathers = ("safe_get_full_fp32_param", "safe_get_full_optimizer_state")
        self._patched = [(torch, "save"), (safetensors.torch, "save_file"), *((deepspeed.utils, g) for g in gathers)]
        self._originals = [getattr(m, name) for m, name in self._patched]
        for (module, name), original in zip(self._patched, self._originals):
            wrap = self._count_gather if name.startswith("safe_get") else self._count_save
            setattr(module, name, wrap(original))
        return self

    def __exit__(self, *exc):
        for (module, name), original in zip(self._patched, self._originals):
            setattr(module, name, original)


def measure(what: str, recipe: str) -> dict:
    """One rank: `save` = setup, one optimizer step, checkpoint.save counted; `resume` = setup, then
    checkpoint.resume counted (the recipe's train.resume names a checkpoint of another world size)."""
    from .. import train as tr
    from ..config import load_config
    from ..train import checkpoint
    from .worker import _proc_status_bytes, peak_bytes, reset_peak
    cfg = load_config(recipe)
    rank, world = dist.init()
    run = tr.setup(cfg)
    if what == "save":
        tr.train_step(run, 0, tr.step_coefficients(run, 0))
    dist.barrier()  # the save starts together on every rank, as it does after a step
    rss = _proc_status_bytes("VmRSS")
    reset_peak(run.device)
    with SaveCounter() as counted:
        t0 = time.perf_counter()
        if what == "save":
            checkpoint.save(run, 1, run.identity)
        else:
            checkpoint.resume(run, run.identity)
        seconds = time.perf_counter() - t0
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in run.engine.module.parameters() if p.requires_grad)
    out = {"what": what, "rank": rank, "world": world, "seconds": seconds, "tensor_bytes": counted.tensor_bytes,
           "file_bytes": counted.file_bytes, "files": counted.files, "gathered_bytes": counted.gathered_bytes,
           "rss_growth_bytes": peak_bytes(run.device) - rss, "trainable_parameters": trainable}
    with open(os.path.join(os.environ["SELFAUG_BENCH_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    return out


def _launch(what: str, raw: dict, tmp: str, world: int, in_process: bool) -> list[dict]:
    """`world` ranks of `measure` (each started with a launcher's variables, like conftest.spawn); the
    report of every rank. `in_process` (the smoke, one rank): in this process."""
    import yaml
    name = f"{what}-{world}-{len(os.listdir(tmp))}"
    recipe, out = os.path.join(tmp, f"{name}.yaml"), os.path.join(tmp, f"out-{name}")
    os.makedirs(out)
    with open(recipe, "w") as f:
        yaml.safe_dump(raw, f)
    if in_process:
        from unittest import mock
        with mock.patch.dict(os.environ, SELFAUG_BENCH_OUT=out):
            return [measure(what, recipe)]
    port, procs = str(dist.free_port()), []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SELFAUG_BENCH_OUT=out, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world))
    for rank in range(world):
        procs.append(subprocess.Popen([sys.executable, "-m", "selfaug.bench.checkpoints", what, recipe], cwd=ROOT,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"checkpoint benchmark {what} on {world} ranks failed:\n"
                           + "\n".join(log[-3000:] for log in logs))
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def _summary(ranks: list[dict]) -> dict:
    keys = ("tensor_bytes", "file_bytes", "gathered_bytes", "rss_growth_bytes", "seconds")
    return {"world": len(ranks), **{f"{k}_max": max(r[k] for r in ranks) for k in keys},
            "file_bytes_total": sum(r["file_bytes"] for r in ranks), "ranks": ranks}


def bench_checkpoint(smoke: bool = False, worlds: tuple = WORLDS) -> dict:
    with tempfile.TemporaryDirectory(prefix="selfaug-bench-checkpoint-") as tmp:
        model = "builtin:tiny-llama"
        if not smoke:
            shape = {**json.load(open(os.path.join(SCALE, "llama3-8b", "config.json"))), **SHAPE}
            model = os.path.join(tmp, "model")
            os.makedirs(model)
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump(shape, f)
        rows, saved = [], {}
        for world in (1,) if smoke else worlds:
            raw = _base(tmp, model, smoke)
            raw["train"].update(adapter="none", freeze_lm_head=False, gradient_accumulation_steps=GLOBAL_BATCH // world,
                                deepspeed=os.path.join(ROOT, "ds_configs/zero3.json"),
                                output_dir=os.path.join(tmp, f"run-{world}"))
            rows.append(_summary(_launch("save", raw, tmp, world, smoke)))
            saved[world] = raw
            r = rows[-1]
            print(f"  checkpoint[{world} ranks]: {r['file_bytes_max'] / 2**20:.1f} MiB written and "
                  f"{r['gathered_bytes_max'] / 2**20:.1f} MiB gathered by the busiest rank, {r['seconds_max']:.2f} s",
                  flush=True)
        for r in rows:
            r["file_bytes_x_world"] = r["file_bytes_max"] * r["world"] / rows[0]["file_bytes_max"]
        out = {"shape": SHAPE if not smoke else model, "rows": rows,
               "trainable_parameters": rows[0]["ranks"][0]["trainable_parameters"]}
        if not smoke and {2, 4} <= set(worlds):  # the 4-rank checkpoint resumed on 2 ranks: universal, loaded
            raw = {**saved[2], "train": {**saved[2]["train"], "resume": os.path.join(tmp, "run-4", "checkpoints",
                                                                                     "step-1")}}
            out["resume_4_to_2"] = _summary(_launch("resume", raw, tmp, 2, False))
            r = out["resume_4_to_2"]
            print(f"  checkpoint[resume 4 -> 2 ranks]: {r['seconds_max']:.2f} s, {r['file_bytes_max'] / 2**20:.1f} MiB "
                  "written by the busiest rank", flush=True)
    return out


def format_checkpoint(r: dict) -> str:
    lines = [f"checkpoint (full fine-tuning, AdamW, ZeRO-3, {r['trainable_parameters'] / 1e6:.0f} M parameters; "
             f"the busiest rank's):", f"  {'ranks':>5}{'MiB written':>13}{'x world / 1 rank':>18}{'MiB gathered':>14}"
             f"{'RSS growth MiB':>16}{'seconds':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['world']:>5}{row['file_bytes_max'] / 2**20:>13.1f}{row['file_bytes_x_world']:>18.3f}"
                     f"{row['gathered_bytes_max'] / 2**20:>14.1f}{row['rss_growth_bytes_max'] / 2**20:>16.1f}"
                     f"{row['seconds_max']:>9.2f}")
    if "resume_4_to_2" in r:
        x = r["resume_4_to_2"]
        lines.append(f"  resume 4 -> 2 ranks (universal form written and loaded): {x['seconds_max']:.2f} s, "
                     f"{x['file_bytes_max'] / 2**20:.1f} MiB written by the busiest rank")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
