"""selfaug: SelfAug fine-tuning (arXiv 2509.03934) without catastrophic forgetting: the frozen model's prompt
distributions computed once and stored (top-k log-probs or sampled ids), read by DeepSpeed ZeRO, the Hugging
Face Trainer or TRL.

Stage 1 `precompute.py` (the store: the `store/` package), the loss `loss.py`, stage 2 the `train/` package
(and `hf/` for the Hugging Face Trainer and TRL), stage 3 the `eval/` package.
"""
__version__ = "0.2.0"
