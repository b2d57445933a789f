"""`selfaug launch STAGE RECIPE [section.key=value ...]` (docs/design.md, "Command line" and "Checkpoints and
preemption").

`selfaug launch` starts a stage from the directory the user stands in: every path (the recipe, data, model, output
directories, `HOSTFILE`) is resolved there, as by `selfaug STAGE` itself, and the ranks run there (on other nodes
too: the runner `cd`s into it). precompute and train go through DeepSpeed's runner: every visible GPU (`NUM_GPUS`
to choose; `CUDA_VISIBLE_DEVICES` named to it), or without GPUs `NUM_PROCS` CPU processes (`DS_ACCELERATOR=cpu`,
the cores shared by `OMP_NUM_THREADS`); `HOSTFILE` names several nodes; `MASTER_PORT` defaults to a free port.
eval runs as one process. `launch.sh` is this plus the set-up of `.venv`.

The stop protocol (`Forwarding`): the runner runs with SIGTERM and SIGUSR1 ignored (it would die of either
without passing it on); a signal to this process reaches the local ranks (the runner's grandchildren) as SIGUSR1
(train) or SIGTERM (precompute: finished shards are kept), and a train stage's `<output_dir>/STOP` is touched, so
ranks on other nodes stop at the same step (on several nodes the file alone carries it: a signal would cut pdsh's
ssh links). Each rank records its status in `$SELFAUG_EXIT_DIR` and in `<output_dir>/.exit/`; this command exits
75 when every rank of the world recorded 75, whatever the runner's own status.

The runner is started as `python -m selfaug.runner` (`runner.py`: every argument quoted for pdsh).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STAGES = ("precompute", "train", "eval", "all")
EXIT_PREEMPTED = 75  # as train.preemption (not imported: it would import torch before OMP_NUM_THREADS is set)
EXITS_WAIT_S = 90  # a network file system's attribute cache: how long the ranks' records on other nodes may take


def gpus() -> int:
    """The GPUs `nvidia-smi -L` lists (0 without the tool or a driver): read without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.stdout.count("\n") if out.returncode == 0 else 0


def stage_env(processes: int) -> dict:
    """The environment of a stage's processes: without GPUs the CPU accelerator and the cores shared between the
    processes (1 thread each for several); the extension cache shared by every run."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/selfaug/torch_extensions"))
    if not gpus():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // processes, 1)))
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def runner_command(stage: str, recipe: str, overrides: list[str]) -> tuple[list[str], dict]:
    """DeepSpeed's runner (as `python -m selfaug.runner`) starting `selfaug STAGE` on every worker, and its
    environment."""
    args = ["--master_port", os.environ.get("MASTER_PORT") or _free_port()]
    visible, n = gpus(), None
    if visible:
        n = os.environ.get("NUM_GPUS") or str(visible)
        if os.environ.get("CUDA_VISIBLE_DEVICES") and not os.environ.get("NUM_GPUS") and not os.environ.get("HOSTFILE"):
            # the runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: name the visible GPUs to it instead
            args += ["--include", f"localhost:{os.environ['CUDA_VISIBLE_DEVICES']}"]
            n = None
    else:
        n = os.environ.get("NUM_PROCS") or "1"
    if os.environ.get("HOSTFILE"):
        args += ["--hostfile", os.environ["HOSTFILE"]]
    if n is not None:
        args += ["--num_gpus", n]
    args += ["--module", "selfaug", stage, "--config", recipe, *overrides]
    return [sys.executable, "-m", "selfaug.runner", *args], stage_env(int(n or 1) if not visible else 1)


def launch(stage: str, recipe: str, overrides: list[str]) -> int:
    """`selfaug launch`: the stage's exit status (75: stopped with a checkpoint; run it again to resume)."""
    if stage == "all":
        for one in ("precompute", "train", "eval"):
            code = launch(one, recipe, overrides)
            if code != 0:
                return code
        return 0
    if stage == "eval":  # generation on one device
        cmd = [sys.executable, "-m", "selfaug", "eval", "--config", recipe, *overrides]
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.run(cmd, env=stage_env(1)).returncode
    run_dir = None
    if stage == "train":  # its STOP file and the ranks' .exit records live there
        from .config import load_config
        run_dir = load_config(recipe, overrides).train.output_dir
    cmd, env = runner_command(stage, recipe, overrides)
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return Forwarding(cmd, env, run_dir, signal.SIGUSR1 if stage == "train" else signal.SIGTERM).run()


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of each child of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            found.append((int(entry), name))
    return found


def ranks_status(where: str, launcher_rc: int) -> int:
    """75 when every rank of the world recorded 75 in `where` (`rank-R-of-W` files), else the launcher's status."""
    files = [f for f in os.listdir(where) if f.startswith("rank-")] if os.path.isdir(where) else []
    if not files:
        return launcher_rc
    world = int(files[0].rsplit("-of-", 1)[1])
    codes = {open(os.path.join(where, f)).read().strip() for f in files}
    return EXIT_PREEMPTED if len(files) == world and codes == {str(EXIT_PREEMPTED)} else launcher_rc


def await_exits(where: str) -> None:
    """After a stop on several nodes: wait (EXITS_WAIT_S at most) until every rank's record is visible here."""
    deadline = time.time() + EXITS_WAIT_S
    while time.time() < deadline:
        files = [f for f in os.listdir(where) if f.startswith("rank-")] if os.path.isdir(where) else []
        if files and len(files) >= int(files[0].rsplit("-of-", 1)[1]):
            return
        time.sleep(2)


class Forwarding:
    """The runner as a child with the stop signals ignored; a stop to this process passed on to the ranks (and
    as `<run_dir>/STOP` to every node's); the status of the ranks, not the runner's, returned."""

    def __init__(self, cmd: list[str], env: dict, run_dir: str | None, stop_signal: int):
        self.cmd, self.env, self.run_dir, self.stop_signal = cmd, env, run_dir, stop_signal
        self.proc, self.stopping = None, False

    def run(self) -> int:
        from .locks import DirectoryBusy, holder
        run_dir = self.run_dir
        if run_dir is not None:  # one job per directory: the STOP, .exit and .launched of a held run are its job's
            busy = holder(run_dir)
            if busy:
                raise DirectoryBusy(f"{run_dir} is in use by another job ({busy}); wait for it to end, or stop it, "
                                    "then run this one again (nothing was changed)")
            # afresh: no stale records or stop; .launched marks this launch's start on the shared file system's
            # clock (a STOP touched after it counts, even while the ranks are still starting up)
            for f in os.listdir(os.path.join(run_dir, ".exit")) if os.path.isdir(os.path.join(run_dir, ".exit")) else []:
                if f.startswith("rank-"):
                    os.remove(os.path.join(run_dir, ".exit", f))
            os.makedirs(run_dir, exist_ok=True)
            for name, keep in (("STOP", False), (".launched", True)):
                path = os.path.join(run_dir, name)
                if os.path.exists(path):
                    os.remove(path)
                if keep:
                    open(path, "w").close()
        with tempfile.TemporaryDirectory(prefix="selfaug-exit.") as status:
            rc = self._wait({**self.env, "SELFAUG_EXIT_DIR": status})
            if run_dir is not None and os.path.exists(os.path.join(run_dir, ".launched")):
                os.remove(os.path.join(run_dir, ".launched"))  # this launch is over: a later one marks its own
            if os.listdir(status) or run_dir is None:
                return ranks_status(status, rc)
        # the ranks ran under pdsh: their records are in the shared run directory; the runner's own status may not
        # be 75 (its SIGTERM handler exits 1) though every rank recorded 75
        if self.stopping and rc != EXIT_PREEMPTED:
            await_exits(os.path.join(run_dir, ".exit"))
        return ranks_status(os.path.join(run_dir, ".exit"), rc)

    def _wait(self, env: dict) -> int:
        def ignore_stops():  # inherited across exec: the runner cannot die of them
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.proc = subprocess.Popen(self.cmd, env=env, preexec_fn=ignore_stops)
        previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            rc = self.proc.wait()  # a handled signal runs `stop`, and the wait goes on (PEP 475)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 128 - rc if rc < 0 else rc

    def stop(self, signum=None, frame=None) -> None:
        """Pass a stop on: one node, the signal to the ranks and the STOP file; several, the file alone."""
        if self.stop_signal == signal.SIGUSR1:
            print("+ selfaug launch: stop requested: the ranks checkpoint at the next optimizer step and exit (75)",
                  file=sys.stderr, flush=True)
        else:
            print("+ selfaug launch: stop requested: SIGTERM to the ranks (finished shards are kept: run again to "
                  "resume)", file=sys.stderr, flush=True)
        runner = self.proc.pid
        several = (os.environ.get("HOSTFILE") or os.path.exists("/job/hostfile")
                   or any(name == "pdsh" for _, name in _children(runner)))
        if not several:
            for launcher, _ in _children(runner):
                for rank, _ in _children(launcher):
                    try:
                        os.kill(rank, self.stop_signal)
                    except ProcessLookupError:
                        pass
        if self.run_dir is not None:
            os.makedirs(self.run_dir, exist_ok=True)
            open(os.path.join(self.run_dir, "STOP"), "a").close()
            os.utime(os.path.join(self.run_dir, "STOP"))
            self.stopping = several

