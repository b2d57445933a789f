"""Which checkpoints are kept (docs/design.md, "Checkpoints and preemption"): with train.save_total_limit = N,
rank 0 removes the oldest `checkpoints/step-*` once a new checkpoint is whole and `checkpoints/latest` names it,
until N are left; latest's target is always one of them. A checkpoint goes by a rename out of the `step-N`
pattern first, then its files: one killed half-way is never half a checkpoint under its own name, and what is
left of it goes at the next rotation.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from ..durable import fsync_dir

STEP = re.compile(r"step-(\d+)")
GOING = ".removing"  # the suffix of a checkpoint being removed


def checkpoints(root: str) -> list[str]:
    """The names of the `step-N` directories under `root`, oldest (smallest N) first."""
    names = [n for n in os.listdir(root) if STEP.fullmatch(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=lambda n: int(STEP.fullmatch(n).group(1)))


def rotate(root: str, limit: int | None, latest: str) -> list[str]:
    """Rank 0, after `latest` names the checkpoint `latest`: the oldest checkpoints under `root` removed until
    `limit` are left, `latest` always kept (None: none removed). Returns the names removed."""
    for left in glob.glob(os.path.join(glob.escape(root), "*" + GOING)):  # an earlier removal that was killed
        shutil.rmtree(left, ignore_errors=True)
    if limit is None:
        return []
    names = checkpoints(root)
    keep = {latest} | set([n for n in names if n != latest][-(limit - 1):] if limit > 1 else [])
    removed = [n for n in names if n not in keep]
    for name in removed:
        os.rename(os.path.join(root, name), os.path.join(root, name + GOING))
    fsync_dir(root)
    for name in removed:
        shutil.rmtree(os.path.join(root, name + GOING), ignore_errors=True)
    if removed:
        print(f"removed {', '.join(removed)} (train.save_total_limit={limit}; latest: {latest})", flush=True)
    return removed
