"""The `hf` benchmark (docs/design.md, "Benchmarks"): one step of `SelfAugTrainer` against a plain
Hugging Face `Trainer` SFT step on the same batches (run by `worker.py` in a fresh process each, so that
each peak is its own: python -m selfaug.bench.trainers {plain|selfaug} RECIPE STEPS [overrides]). Both trainers get the recipe's model with its LoRA adapters, batch geometry and
DeepSpeed config; the plain one computes the model's own loss from full logits, as SFT does.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from ..config import load_config


class _Timer:
    """A TrainerCallback: the time of each optimizer step, and the peak memory reset after the first one
    (allocator warm-up and lazy inits are not measured)."""

    def __init__(self, device):
        self.device, self.times, self.t0 = device, [], None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        from .worker import sync
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        from .worker import reset_peak, sync
        sync(self.device)
        if state.global_step == 1:
            reset_peak(self.device)
        else:
            self.times.append(time.perf_counter() - self.t0)


def _plain_collator(collator):
    """The same collated rows as the model's own loss wants them: unshifted labels (the model shifts)."""
    def collate(features):
        b = collator(features)
        labels = torch.full_like(b["labels"], -100, dtype=torch.long)
        labels[:, 1:] = b["labels"][:, :-1]
        return {"input_ids": b["input_ids"].long(), "attention_mask": b["attention_mask"].long(), "labels": labels}
    return collate


def hf_step(variant: str, cfg_path: str, steps: int, overrides: list[str]) -> dict:
    """variant: `selfaug` (SelfAugTrainer at the recipe's alpha, or 0.5) or `plain` (Trainer, full-logits SFT)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from .. import store
    from ..hf import SelfAugCollator, SelfAugTrainer, StepOrder, store_dataset
    from ..models import load_model, load_tokenizer_for, resolve_dtype
    from ..train import lora_config
    from .worker import peak_bytes
    cfg = load_config(cfg_path, list(overrides))
    tc = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model, resolve_dtype(cfg.model.dtype, device))
    model.requires_grad_(False)
    torch.manual_seed(tc.seed)
    model = get_peft_model(model, lora_config(tc))
    tok = load_tokenizer_for(cfg.model)
    timer = _Timer(device)
    args = TrainingArguments(tempfile.mkdtemp(prefix="selfaug-bench-hf-"), max_steps=steps + 1,
                             per_device_train_batch_size=tc.micro_batch_size,
                             gradient_accumulation_steps=tc.gradient_accumulation_steps, learning_rate=tc.learning_rate, optim="adamw_torch",
                             lr_scheduler_type="constant", report_to=[], save_strategy="no", seed=tc.seed,
                             use_cpu=device.type == "cpu", deepspeed=tc.deepspeed, disable_tqdm=True,
                             bf16=device.type == "cuda" and cfg.model.dtype != "float32", logging_steps=10**9,
                             remove_unused_columns=False)
    alpha = tc.alpha or 0.5
    if variant == "selfaug":
        trainer = SelfAugTrainer(model=model, args=args, teacher_store=cfg.teacher.output_dir, alpha=alpha,
                                 processing_class=tok, loss_chunk_rows=tc.loss_chunk_rows, callbacks=[timer])
    else:
        teacher = store.TeacherStore(cfg.teacher.output_dir)

        class Plain(Trainer):
            def _get_train_sampler(self, dataset=None):  # the same batches as SelfAugTrainer's
                return StepOrder(len(self.train_dataset), tc.micro_batch_size, tc.gradient_accumulation_steps, 1, tc.seed, steps + 1)
        trainer = Plain(model=model, args=args, train_dataset=store_dataset(teacher), callbacks=[timer],
                        data_collator=_plain_collator(SelfAugCollator(teacher, tok.pad_token_id)))
    trainer.train()
    return {"variant": variant, "step_time_s": float(np.median(timer.times)), "peak_bytes": peak_bytes(device),
            "steps": steps, "alpha": alpha if variant == "selfaug" else 0.0, "pid": os.getpid()}


def main(argv: list[str]) -> dict:
    argv = [a for a in argv if not a.startswith("--local_rank")]
    return hf_step(argv[0], argv[1], int(argv[2]), argv[3:])


if __name__ == "__main__":
    import json
    import sys

    from .. import dist
    dist.ensure_env()
    print(json.dumps(main(sys.argv[1:])))
