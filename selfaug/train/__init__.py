"""Stage 2 (docs/design.md, "Stage 2"): `selfaug train`, fine-tuning on a DeepSpeed ZeRO engine with
loss = NLL(response) + alpha(step) * KL(prompt).

  loop.py        setup -> train -> save_final on `deepspeed.initialize`; the run's state in one `Run`
  objective.py   the module the engine runs per micro-batch, the step's coefficients, alpha and lr schedules
  alpha.py       alpha at each step: the recipe's schedule, or steered by a drift budget (train.drift_budget)
  sources.py     the teacher source, chosen once (stored signal, live model, plain data)
  batches.py     which examples form each step and micro-batch (by count or by tokens); the layouts; collation
  prefetch.py    each micro-batch read, collated and pinned on a background thread ahead of its step
  metrics.py     metrics.jsonl and the loggers of train.report_to
  validation.py  the NLL on data.eval every train.eval_steps
  checkpoint.py  checkpoints (each rank its own partition), resume at any world size (universal form)
  retention.py   the oldest checkpoints removed beyond train.save_total_limit, never latest's target
  preemption.py  a stop on a signal: a checkpoint at the step boundary, exit 75, the launcher never left paused
  final.py       the trained model in Hugging Face form (final/, and checkpoints/step-N/hf/ with train.save_hf)
"""
from .checkpoint import CheckpointError
from .preemption import EXIT_PREEMPTED, Preempted
from .loop import Run, TrainError, ds_config, save_final, setup, step_coefficients, train, train_step, zero_stage
from .objective import Coefficients, Objective, alpha_at, coefficients, lora_config, lr_factor

__all__ = ["EXIT_PREEMPTED", "CheckpointError", "Coefficients", "Objective", "Preempted", "Run", "TrainError",
           "alpha_at", "coefficients", "ds_config", "lora_config", "lr_factor", "save_final", "setup",
           "step_coefficients", "train", "train_step", "zero_stage"]
