"""selfaug: SelfAug fine-tuning (arXiv 2509.03934) without catastrophic forgetting: the frozen model's prompt
distributions computed once and stored (top-k log-probs or sampled ids), read by DeepSpeed ZeRO, the Hugging
Face Trainer or TRL.

Stage 1 `precompute.py` (the store: the `store/` package), the loss `loss.py`, stage 2 the `train/` package
(and `hf/` for the Hugging Face Trainer and TRL), stage 3 the `eval/` package.
"""
__version__ = "0.2.0"


def __getattr__(name: str):
    """`selfaug.precompute_store(model, tokenizer, dataset, output_dir, ...)`: stage 1 from Python (the module
    `selfaug.precompute` is the command's stage; this function writes the same store). Imported on first use, so
    that `import selfaug` stays light."""
    if name == "precompute_store":
        from .precompute import precompute_store
        return precompute_store
    raise AttributeError(f"module 'selfaug' has no attribute {name!r}")
