"""Stage 2's metrics (docs/design.md, "Stage 2"): one row per logged optimizer step to metrics.jsonl (strict
JSON, rank 0), and the same keys to the loggers of train.report_to: TensorBoard and CSV through DeepSpeed's monitor,
Weights & Biases through selfaug's own run (DeepSpeed's W&B monitor logs its sample-count steps first, after which
W&B drops every lower step).
"""
from __future__ import annotations

import json
import os

from ..config import Config
from ..durable import write_atomic
from .checkpoint import CheckpointError


def wandb_run(cfg: Config, rank: int):
    """The run's W&B run on rank 0 when train.report_to has wandb (offline unless WANDB_MODE says otherwise)."""
    if rank != 0 or "wandb" not in cfg.train.report_to:
        return None
    import wandb
    tc = cfg.train
    return wandb.init(project=tc.wandb_project, dir=os.environ.get("WANDB_DIR"), config=cfg.to_dict(),
                      name=tc.run_name or os.path.basename(os.path.normpath(tc.output_dir)), mode=wandb_mode(tc),
                      reinit="finish_previous")


def wandb_mode(tc) -> str:
    """train.wandb_mode: auto is online with an API key (WANDB_API_KEY, or the one `wandb login` stored) or
    WANDB_MODE=online, else offline (nothing leaves the machine unasked; `wandb sync` uploads the run later)."""
    if tc.wandb_mode != "auto":
        return tc.wandb_mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") or stored_wandb_key() else "offline"


def stored_wandb_key() -> bool:
    """Whether `wandb login` stored an API key for the W&B server (WANDB_BASE_URL, default api.wandb.ai): its netrc
    entry, found as wandb finds it ($NETRC, else ~/.netrc), read without the network."""
    import netrc
    from urllib.parse import urlsplit
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        entry = netrc.netrc(os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no file, or one netrc cannot read: no stored key
        return False
    return bool(entry and entry[2])


def log(run, path: str, row: dict) -> None:
    """metrics.jsonl (strict JSON), and the same keys to W&B and DeepSpeed's monitors (train.report_to)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    if run.wandb is not None:
        run.wandb.log({key: value for key, value in row.items() if key != "step"}, step=row["step"])
    monitor = getattr(run.engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events([(key, float(value), row["step"]) for key, value in row.items() if key != "step"])


def truncate(path: str, step: int) -> None:
    """Drop metric lines past the resumed step, so a resumed run's file equals an uninterrupted one's. A last
    line torn by a full disk or a crash mid-append is cut off with a message (a torn line elsewhere is an error:
    the file was edited). Rewritten whole or not at all."""
    if not os.path.exists(path):
        return
    lines, rows = open(path, encoding="utf-8", errors="replace").read().splitlines(), []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if any(x.strip() for x in lines[i + 1:]):
                raise CheckpointError(f"{path}:{i + 1} is not JSON ({line[:60]!r}); fix or remove that line, then "
                                    "resume") from None
            print(f"{path}: its last line ({i + 1}) was torn by a crash or a full disk and is cut off: {line[:60]!r}",
                  flush=True)
            break
        if row["step"] <= step:
            rows.append(line + "\n")
    write_atomic(path, "".join(rows))
