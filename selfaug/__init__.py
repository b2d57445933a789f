"""selfaug: SelfAug fine-tuning (arXiv 2509.03934) with an offline top-k teacher store and DeepSpeed ZeRO.

Stage 1 `precompute.py` (store format: the `store/` package), the loss `loss.py`, stage 2 `train.py`,
stage 3 `evaluate.py`.
"""
__version__ = "0.1.0"
