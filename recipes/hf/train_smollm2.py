"""SelfAug in the Hugging Face Trainer on the embedded SmolLM2-135M-Instruct (CPU ok).

    .venv/bin/python -m selfaug precompute --config recipes/smollm2_demo.yaml teacher.output_dir=runs/hf/teacher
    .venv/bin/python recipes/hf/train_smollm2.py runs/hf/teacher runs/hf/out            # one process
    .venv/bin/accelerate launch --config_file recipes/hf/accelerate_zero2.yaml \
        recipes/hf/train_smollm2.py runs/hf/teacher runs/hf/out                        # DeepSpeed ZeRO-2

Then `selfaug eval --config recipes/smollm2_demo.yaml eval.runs=runs/hf/out/final` scores the adapter.
"""
import sys

from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from selfaug.hf import SelfAugTrainer
from selfaug.models import load_model, load_tokenizer

BASE = "builtin:smollm2-135m-instruct"  # the store's model: a hub id or a directory for your own


def main(store: str = "runs/hf/teacher", out: str = "runs/hf/out") -> None:
    model = get_peft_model(load_model(BASE), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                        task_type="CAUSAL_LM"))
    args = TrainingArguments(out, max_steps=60, per_device_train_batch_size=4, learning_rate=2e-4,
                             lr_scheduler_type="cosine", logging_steps=5, save_strategy="no", report_to=[], seed=42)
    trainer = SelfAugTrainer(model=model, args=args, teacher_store=store, alpha=0.5,
                             processing_class=load_tokenizer(BASE))
    trainer.train()
    trainer.save_model(f"{out}/final")


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
