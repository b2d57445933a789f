"""One SelfAugTrainer run of a selfaug recipe's settings, for the equivalence tests: run in-process
(`hf_run(recipe, out)`) or as each rank of a launch (`python tests/helpers/hf_train.py RECIPE OUT [trl] [FSDP]`,
FSDP an fsdp_config as JSON, or a list of one per run; RECIPE and OUT may list several runs, comma-separated,
run one after another in the launch).

The model, the LoRA adapters (seeded as `selfaug train` seeds them), the optimizer (SGD or AdamW at the
recipe's lr, constant), clipping, batch geometry and DeepSpeed config are the recipe's, so that the
trainer's result can be compared with `selfaug train`'s on the same store."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def hf_run(recipe: str, out: str, trainer: str = "hf", deepspeed: bool = True, args_extra=None, resume=None,
           fsdp: dict | None = None, **extra):
    """args_extra: more TrainingArguments; resume: a checkpoint to resume from; fsdp: an fsdp_config to shard with
    (fsdp="full_shard") instead of the recipe's DeepSpeed config; extra: the trainer's keywords."""
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
                  activation_checkpointing=tc.gradient_checkpointing,
                  report_to=[], save_strategy="no", use_cpu=True,
                  # under `accelerate launch` the accelerate config names the DeepSpeed file
                  deepspeed=(tc.deepspeed if deepspeed and not fsdp and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true"
                             else None),
                  disable_tqdm=True)
    if fsdp:
        kwargs.update(fsdp="full_shard", fsdp_config=fsdp)
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
    if fsdp:
        as_fsdp_on_cpu(t)
    t.train(resume_from_checkpoint=resume)
    if fsdp:  # accelerate's full state dict keeps FSDP's shards (DTensors) on CPU ranks: gathered here, named as
        from torch.distributed.tensor import DTensor  # torch.distributed.checkpoint names them (no wrapper's name)
        state = {k.replace("._checkpoint_wrapped_module", ""): v.full_tensor() if isinstance(v, DTensor) else v
                 for k, v in t.model.state_dict().items()}
        t._save(os.path.join(out, "final"), state_dict=state)
    else:
        t.save_model(os.path.join(out, "final"))
    return t


def as_fsdp_on_cpu(trainer):
    """accelerate shards with FSDP only on accelerators: on CPU ranks it leaves the plugin aside and wraps the model
    in DDP, silently. Here the trainer's accelerator is switched to the FSDP plugin the Trainer built, before
    train() prepares the model, so the Trainer's own FSDP path (accelerate's fsdp2_prepare_model: fully_shard per
    decoder layer, the final norm with the head, the root) runs over gloo."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        if trainer.args.bf16:
            state.fsdp_plugin.set_mixed_precision("bf16")
        state.distributed_type = DistributedType.FSDP
        trainer.is_fsdp_enabled = True


class CountFsdpHead:
    """A TrainerCallback that counts, while training, FSDP2's all-gathers whose output holds the head's weight
    (with the bytes gathered) and its reduce-scatters of the head's gradient, wrapping the two functions of
    torch's FSDP2 param group that issue them; `save(path)` writes the counts."""

    def __init__(self):
        self.counts = {"gathers": 0, "gathered_bytes": 0, "reduce_scatters": 0, "micro_batches": 0}

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
        from selfaug.models import decoder_and_head
        head = decoder_and_head(model)[1]
        self.patched = {name: getattr(group, name) for name in ("foreach_all_gather", "foreach_reduce")}

        def heads(fsdp_params):
            return [p for p in fsdp_params if p._module_info.module is head and p._module_info.param_name == "weight"]

        def all_gather(fsdp_params, *a, **k):
            for p in heads(fsdp_params):
                self.counts["gathers"] += 1
                self.counts["gathered_bytes"] += p._orig_size.numel() * (p.param_dtype or p.orig_dtype).itemsize
            return self.patched["foreach_all_gather"](fsdp_params, *a, **k)

        def reduce(fsdp_params, *a, **k):
            self.counts["reduce_scatters"] += len(heads(fsdp_params))
            return self.patched["foreach_reduce"](fsdp_params, *a, **k)
        group.foreach_all_gather, group.foreach_reduce = all_gather, reduce

    def on_step_end(self, args, state, control, **kwargs):
        self.counts["micro_batches"] += args.gradient_accumulation_steps

    def on_train_end(self, args, state, control, **kwargs):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
        for name, fn in self.patched.items():  # saving gathers too
            setattr(group, name, fn)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.counts, f)


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    runs = list(zip(argv[0].split(","), argv[1].split(","), strict=True))
    fsdp = [json.loads(a) for a in argv[2:] if a[0] in "{["]
    fsdp = (fsdp[0] if isinstance(fsdp[0], list) else fsdp * len(runs)) if fsdp else [None] * len(runs)
    trainer = [a for a in argv[2:] if a[0] not in "{["]
    for (recipe, out), config in zip(runs, fsdp, strict=True):
        counter = [CountFsdpHead()] if config and config.get("version", 2) == 2 else []
        hf_run(recipe, out, *trainer[:1], fsdp=config, callbacks=counter)
        for c in counter:
            c.save(os.path.join(out, f"fsdp_head_rank{os.environ.get('RANK', '0')}.json"))
