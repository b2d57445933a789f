"""Process-group helpers shared by the stages: one process, torchrun, or the deepspeed launcher
(docs/design.md, "Architecture")."""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from . import shipped
from .config import TrainConfig
from .errors import SelfAugError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Give a plain `python` run the env of a 1-process launch (DeepSpeed would look for MPI otherwise), and on
    the CPU keep DeepSpeed's shared-memory op unloaded (`skip_cpu_shm_op`)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    skip_cpu_shm_op()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def skip_cpu_shm_op() -> None:
    """Without a GPU (DeepSpeed's CPU accelerator), DeepSpeed's comm backend loads its shared-memory all-reduce
    op, `deepspeed_shm_comm`, in every process: compiled on first use, then a ninja check under torch's build
    lock at every start. The op serves `inference_all_reduce` (tensor-parallel inference) only, which no stage
    calls, so it is marked unavailable and DeepSpeed keeps the process group's gloo all-reduce, as it does off
    Linux: nothing is compiled or mapped in /dev/shm, and a process killed while starting cannot leave torch's
    build lock behind for every later start to wait on. Called before DeepSpeed's comm backend is made: by
    `ensure_env` (so by `init`) and at `import selfaug.hf`."""
    if os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "") != "cpu":
        return
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


STALE_BUILD_LOCK_S = 10 * 60  # a build writes its files as it goes: none for 10 minutes is no build


def check_build_locks() -> None:
    """torch takes `<extensions dir>/<op>/lock` each time a process loads one of DeepSpeed's compiled ops,
    and waits for it without end: a process killed while holding it (SIGKILL during start-up) leaves every
    later run hanging. A lock in a folder where nothing has changed for 10 minutes is named here instead."""
    import glob
    import time
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        folder = os.path.dirname(lock)
        try:
            age = time.time() - max(os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder))
            if not os.path.exists(lock):
                continue  # released meanwhile
        except (OSError, ValueError):
            continue
        if age > STALE_BUILD_LOCK_S:
            raise DistError(f"{lock}: nothing in its folder has changed for {age / 60:.0f} minutes, so a process "
                            "killed while loading a compiled DeepSpeed op left it, and torch would wait for it "
                            "forever; remove it (when no build is running) and run the command again")


def init(timeout_s: float = TrainConfig.ddp_timeout) -> tuple[int, int]:
    """(rank, world_size); a process group is created only when there are several ranks. Its collectives wait
    up to `timeout_s` (train.ddp_timeout) for the other ranks before the run fails: torch's default for NCCL,
    10 minutes, is shorter than waits that are normal here (rank 0 writing final/ or merging the adapter while
    the others wait at a barrier; precompute's ranks meeting only at the end). DeepSpeed's own subgroups
    (`new_group`, e.g. its copy of the world group for ZeRO's gathers) keep torch's default: their waits are
    in lockstep, never a phase one rank runs alone."""
    ensure_env()
    check_build_locks()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        # device_id: NCCL connects eagerly and derives sub-groups (DeepSpeed's) by ncclCommSplit
        extra = {"device_id": device()} if torch.cuda.is_available() else {}
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s),
                                **extra)
    return rank, world


def timeout(cfg) -> timedelta:
    """The recipe's collective timeout (train.ddp_timeout, which `selfaug precompute` reads too), as
    `deepspeed.init_distributed(timeout=...)` takes it."""
    return timedelta(seconds=cfg.train.ddp_timeout)


def alone(what: str, timeout_s: float) -> str | None:
    """Before a phase that rank 0 runs alone while the other ranks wait at a barrier: one line, printed on
    rank 0, saying so and how long they wait before their collective fails (train.ddp_timeout), so that a
    phase longer than that is seen in the log for what it is. None with one rank."""
    rank, world = rank_world()
    if world == 1:
        return None
    line = f"rank 0 {what}; the other ranks wait at a barrier (up to train.ddp_timeout = {timeout_s / 60:g} min)"
    if rank == 0:
        print(line, flush=True)
    return line


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a small picklable object)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decide(fn):
    """fn() run on rank 0 only, its result (or the exception it raised) the same on every rank: a decision
    that ranks must share (a directory's state, a file read once) is taken once and broadcast, so that no
    rank can take another branch (and wait at a barrier the others never reach)."""
    got = None
    if rank_world()[0] == 0:
        try:
            got = (True, fn())
        except Exception as e:  # raised below, on every rank alike
            got = (False, _portable(e))
    if dist.is_initialized():
        box = [got]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
    ok, value = got
    if not ok:
        raise value
    return value


def together(fn):
    """fn() on every rank; an exception on any rank is raised on every rank (the lowest failing rank's), so a
    phase whose failure one rank alone may see (a file one node cannot read) ends every rank at once, not at
    their next collective after train.ddp_timeout."""
    try:
        value, failure = fn(), None
    except Exception as e:
        value, failure = None, _portable(e)
    failed = [f for f in all_gather_object(failure) if f is not None]
    if failed:
        raise failed[0]
    return value


def _portable(e: Exception) -> Exception:
    """`e` where it pickles (to be sent to the other ranks), else a RuntimeError with its words."""
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def all_reduce_sum(values):
    """Elementwise sum over ranks of a small numpy array (the array itself with one rank)."""
    import numpy as np
    if not dist.is_initialized():
        return np.asarray(values)
    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(device())  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return t.cpu().numpy()


def all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class DistError(SelfAugError, ValueError):
    """A DeepSpeed config that cannot be used as given: the message names the file and the key."""


def deepspeed_config(path: str, fill: dict) -> dict:
    """A DeepSpeed JSON config with its "auto" values filled from `fill` (dotted keys from the recipe)."""
    try:
        with open(shipped.resolve(path)) as f:
            conf = json.load(f)
    except OSError as e:
        raise DistError(f"DeepSpeed config {path!r} cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DistError(f"DeepSpeed config {path}: invalid JSON ({e.msg} at line {e.lineno})") from None

    def walk(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif value == "auto":
                if dotted not in fill:
                    raise DistError(f"{path}: no recipe value for \"auto\" at {dotted}")
                node[key] = fill[dotted]
    walk(conf)
    return conf
