"""One SelfAugTrainer run of a selfaug recipe's settings, for the equivalence tests: run in-process
(`hf_run(recipe, out)`) or as each rank of a launch (`python tests/helpers/hf_train.py RECIPE OUT [trl]`).

The model, the LoRA adapters (seeded as `selfaug train` seeds them), the optimizer (SGD or AdamW at the
recipe's lr, constant), clipping, batch geometry and DeepSpeed config are the recipe's, so that the
trainer's result can be compared with `selfaug train`'s on the same store."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def hf_run(recipe: str, out: str, trainer: str = "hf", deepspeed: bool = True, args_extra=None, resume=None,
           **extra):
    """args_extra: more TrainingArguments; resume: a checkpoint to resume from; extra: the trainer's keywords."""
    import torch
    from transformers import TrainingArguments

    from selfaug.config import load_config
    from selfaug.hf import SelfAugMixin, SelfAugTrainer
    from selfaug.models import load_model, load_tokenizer_for
    from selfaug.train import lora_config
    cfg = load_config(recipe)
    tc = cfg.train
    assert tc.warmup_steps == 0 and tc.min_lr_ratio == 1.0, "the comparison runs at a constant lr"
    model = load_model(cfg.model)  # its attention implementation included
    if tc.adapter == "lora":
        from peft import get_peft_model
        model.requires_grad_(False)
        torch.manual_seed(tc.seed)
        model = get_peft_model(model, lora_config(tc))
    kwargs = dict(output_dir=out, max_steps=tc.max_steps, per_device_train_batch_size=tc.micro_batch_size,
                  gradient_accumulation_steps=tc.gradient_accumulation_steps, learning_rate=tc.learning_rate,
                  optim=tc.optim, lr_scheduler_type="constant",
                  weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, seed=tc.seed, logging_steps=1,
                  report_to=[], save_strategy="no", use_cpu=True,
                  # under `accelerate launch` the accelerate config names the DeepSpeed file
                  deepspeed=tc.deepspeed if deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true" else None,
                  disable_tqdm=True)
    kwargs.update(args_extra or {})
    if trainer == "trl":
        from trl import SFTConfig, SFTTrainer

        class SelfAugSFTTrainer(SelfAugMixin, SFTTrainer):
            pass
        # SFTConfig turns bf16 autocast on by default; the comparison runs in float32 like the recipe
        args, cls = SFTConfig(**kwargs, max_length=None, bf16=False), SelfAugSFTTrainer
    else:
        args, cls = TrainingArguments(**kwargs), SelfAugTrainer
    t = cls(model=model, args=args, teacher_store=cfg.teacher.output_dir, alpha=tc.alpha,
            processing_class=load_tokenizer_for(cfg.model), packing=tc.packing, pack_tokens=tc.pack_tokens,
            loss_chunk_rows=tc.loss_chunk_rows, **extra)
    t.train(resume_from_checkpoint=resume)
    t.save_model(os.path.join(out, "final"))
    return t


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    hf_run(argv[0], argv[1], *argv[2:3])
