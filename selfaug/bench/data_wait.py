"""`selfaug bench --only prefetch` (docs/design.md, "Benchmarks"): the share of a training step spent waiting
for its micro-batches (`data_wait_s` / `step_time_s` of metrics.jsonl, the first step left out), with the
micro-batches made on the training thread (`train.prefetch=0`) and made ahead on a thread (`train.prefetch=2`),
on the store as it is and on a store read as from a slow disk (each example's read delayed: a network
filesystem). Each run in its own process; the same losses either way (tests/train/test_train.py).

One run: python -m selfaug.bench.data_wait RECIPE PREFETCH DELAY_MS STEPS [overrides]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time


def measure(cfg_path: str, prefetch: int, delay_ms: float, steps: int, overrides: list[str]) -> dict:
    from ..config import load_config
    from ..store import TeacherStore
    from ..train import train
    real = TeacherStore.example

    def slow(self, i):  # every example read from the store waits, as on a slow shared filesystem
        time.sleep(delay_ms / 1000)
        return real(self, i)
    out_dir = tempfile.mkdtemp(prefix="selfaug-bench-wait-")
    cfg = load_config(cfg_path, list(overrides) + [f"train.prefetch={prefetch}", f"train.max_steps={steps + 1}",
                                                   f"train.output_dir={out_dir}", "train.resume=never",
                                                   "train.save_steps=0", "train.monitor_kl_every=0"])
    TeacherStore.example = slow if delay_ms else real
    try:
        train(cfg)
    finally:
        TeacherStore.example = real
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))][1:]
    shutil.rmtree(out_dir, ignore_errors=True)
    wait, step = sum(r["data_wait_s"] for r in rows), sum(r["step_time_s"] for r in rows)
    return {"prefetch": prefetch, "delay_ms_per_example": delay_ms, "steps": len(rows), "wait_share": wait / step,
            "step_time_s": step / len(rows), "data_wait_s": wait / len(rows), "nll": [r["nll"] for r in rows]}


def main(argv: list[str]) -> dict:
    return measure(argv[0], int(argv[1]), float(argv[2]), int(argv[3]), argv[4:])


if __name__ == "__main__":
    from .. import dist
    dist.ensure_env()
    print(json.dumps(main(sys.argv[1:])))
