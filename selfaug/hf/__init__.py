"""SelfAug in the trainers users already run (docs/design.md, "In your own trainer"): the Hugging Face
`Trainer`, TRL's `SFTTrainer` (through the mixin) and so axolotl and accelerate, on a teacher store.

  trainer.py   `SelfAugMixin` and `SelfAugTrainer`: the store checked, the loss and its normalization
  dataset.py   the store's examples as a dataset, a user's dataset matched to it, the seeded step
               order of `selfaug train`, and the collator that carries the teacher rows

    from selfaug.hf import SelfAugTrainer
    trainer = SelfAugTrainer(model=model, args=TrainingArguments(...), teacher_store="stores/my_store", alpha=0.5)
    trainer.train(); trainer.save_model("out/final")
"""
from .. import dist
from .dataset import SelfAugCollator, StepOrder, match_dataset, store_dataset
from .trainer import SelfAugMixin, SelfAugTrainer, check_store_for

# Without a GPU: DeepSpeed's shared-memory op stays unloaded (dist.skip_cpu_shm_op) when this module is imported
# before TrainingArguments, whose accelerate state makes DeepSpeed's comm backend.
dist.skip_cpu_shm_op()

__all__ = ["SelfAugCollator", "SelfAugMixin", "SelfAugTrainer", "StepOrder", "check_store_for", "match_dataset",
           "store_dataset"]
