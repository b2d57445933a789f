"""The trained model in Hugging Face form (docs/design.md, "Checkpoints and preemption"): `final/` holds the peft
adapter (and `final/merged/` with train.merge_adapter) or the full model, the tokenizer and the resolved recipe. It is
written beside the old one and swapped in by rename once whole, its marker `final/COMPLETE` last (`durable`): a save
that fails or is killed leaves the previous `final/` as it was.
Under ZeRO-3 a LoRA run gathers only its adapter tensors, one at a time; a full model is consolidated on rank 0
(16-bit where it trains in 16-bit) while the other ranks wait (the log says for how long they may).
With train.save_hf each checkpoint gets the same files in `checkpoints/step-N/hf/` (`save_hf_checkpoint`).
"""
from __future__ import annotations

import os
import shutil
import time

import torch

from .. import dist
from ..config import Config
from ..durable import fsync_tree, replace_dir, staging_dir
from ..errors import SelfAugError
from .checkpoint import CheckpointError, _why_not_written
from ..models import load_tokenizer_for, resolve_dtype


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0


def _zero3_state_dict(engine, model, lora: bool):
    """The trained weights on rank 0 (None elsewhere) under ZeRO-3: for LoRA only the adapters are
    gathered, one tensor at a time; a full model is consolidated (16-bit where it trains in 16-bit)."""
    import deepspeed
    if not lora:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the whole, others None
        return {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.detach().cpu().clone()
    return state


def trained_state(run):
    """All ranks: the trained weights as `write_hf` takes them, on rank 0 (None elsewhere under ZeRO-3, where
    `_zero3_state_dict` gathers them: a LoRA run's adapter tensors one at a time, a full model consolidated)."""
    engine, model, lora = run.engine, run.engine.module.model, run.cfg.train.adapter == "lora"
    if zero_stage(engine) != 3:
        return model.state_dict()
    state = _zero3_state_dict(engine, model, lora)
    if lora and run.rank == 0:  # names as peft saves them
        from peft.utils import get_peft_model_state_dict
        state = get_peft_model_state_dict(model, state_dict=state)
    return state


def write_hf(run, state, target: str) -> None:
    """Rank 0: the peft adapter (LoRA) or the model (full) from `trained_state` in `target`, with the tokenizer and
    the resolved recipe (`selfaug_config.yaml`): what peft, transformers and `selfaug eval` read."""
    model = run.engine.module.model
    if run.cfg.train.adapter == "lora" and zero_stage(run.engine) == 3:
        _save_adapter(model, state, target)
    else:
        model.save_pretrained(target, state_dict=state)
    run.tok.save_pretrained(target)
    run.cfg.save(os.path.join(target, "selfaug_config.yaml"))


def save_hf_checkpoint(run, path: str) -> None:
    """All ranks (ZeRO-3 gathers): checkpoint `path`'s weights in Hugging Face form in `path`/hf (train.save_hf),
    written before `latest` names the checkpoint (`checkpoint.save`)."""
    state = trained_state(run)
    if run.rank == 0:
        if zero_stage(run.engine) == 3 and run.cfg.train.adapter != "lora":
            print("rank 0 holds the whole 16-bit model to write it in Hugging Face form (train.save_hf)", flush=True)
        from safetensors import SafetensorError
        try:
            write_hf(run, state, os.path.join(path, "hf"))
            fsync_tree(os.path.join(path, "hf"))  # its writer flushes it: no other rank walks it meanwhile
        except SafetensorError as e:  # a failed write, as checkpoint.save counts them
            raise OSError(f"safetensors: {e}") from None


def save_final(run) -> str:
    """Hugging Face form under <output_dir>/final: the peft adapter (and merged model on request) or the
    full model. Under ZeRO-3 the parameters are gathered to rank 0 first. Written into `final.tmp-<host>-<pid>`
    and swapped in whole (`replace_dir`): until then the previous `final/`, if any, is untouched."""
    cfg = run.cfg
    final = os.path.join(cfg.train.output_dir, "final")
    state = trained_state(run)
    def write() -> None:  # rank 0, the others waiting in dist.decide: its failure ends every rank at once
        dist.alone(f"writes {final} (the model in Hugging Face form)", cfg.train.ddp_timeout)
        staged = staging_dir(final)
        try:
            write_hf(run, state, staged)
            if cfg.train.adapter == "lora" and cfg.train.merge_adapter:
                dist.alone("merges the adapter into the model (final/merged)", cfg.train.ddp_timeout)
                merge_adapter(cfg, staged)
            replace_dir(staged, final, f"written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        except BaseException as e:
            shutil.rmtree(staged, ignore_errors=True)  # the previous final/ stays as it was
            from safetensors import SafetensorError
            if isinstance(e, SelfAugError) or not isinstance(e, (OSError, RuntimeError, SafetensorError)):
                raise  # not a failed write (torch reports one as a RuntimeError, safetensors as its own error)
            kept = "the previous final/ is kept as it was" if os.path.isdir(final) else "no final/ is claimed"
            raise CheckpointError(f"{final} could not be written ({_why_not_written(e, cfg.train.output_dir)}); "
                                  f"{kept}: free space (or raise the file-size limit) and run the same command "
                                  "again (it resumes from the last checkpoint)") from None
    dist.decide(write)
    return final


def _save_adapter(model, adapter_state: dict, final: str) -> None:
    """A peft adapter directory from an already-named adapter state dict (ZeRO-3: the model's own
    tensors are empty partitions, so peft's save_pretrained cannot read them)."""
    from safetensors.torch import save_file
    os.makedirs(final, exist_ok=True)
    model.peft_config["default"].save_pretrained(final)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, os.path.join(final, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def merge_adapter(cfg: Config, final: str, dtype: torch.dtype | None = None) -> str:
    """<final>/merged: the adapter merged in fp32 into the base streamed file by file (`merge.merge`), saved in
    `dtype` (default: the run's, bf16 on a GPU), with what that cast lost of the update printed and in
    merged/merge_report.json."""
    from .merge import describe, merge
    dtype = dtype or resolve_dtype(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    target = os.path.join(final, "merged")
    report = merge(final, cfg.model, target, dtype, tokenizer=load_tokenizer_for(cfg.model))
    print(describe(report, target), flush=True)
    return target
