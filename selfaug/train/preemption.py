"""Preemption (docs/design.md, "Checkpoints and preemption"): a stop requested by a signal ends every rank
at the same optimizer-step boundary with a checkpoint and exit status 75 (`EXIT_PREEMPTED`).

`StopFlag` turns the signals of `train.exit_signals` into a flag; the flag rides on the one all-reduce of
each optimizer step, so all ranks see a stop at the same step boundary, save a checkpoint there and exit
with 75. A second signal while stopping is ignored. A cluster delivers the stop to every process at once,
the launcher included, and the launchers (DeepSpeed's `launch.py`, torchrun's agent) then relay it and
kill their ranks 30 s later, however far the save has got: a rank whose parent is such a launcher pauses
it (SIGSTOP) at the first signal and lets it go (SIGCONT) on its way out, once the checkpoint is written;
a watchdog process lets it go if the rank ends without a way out (SIGKILL, the OOM killer).
`record_exit` leaves each rank's exit status where `launch.sh` reads it (`SELFAUG_EXIT_DIR`), since the
launchers do not pass 75 on.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time

from .. import dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again to resume


class Preempted(Exception):
    """The run stopped on a signal of train.exit_signals, with a checkpoint at `step` (exit status 75)."""

    def __init__(self, step: int, path: str, seconds: float):
        super().__init__(f"stopped on request after optimizer step {step}, checkpoint {path} (written in "
                         f"{seconds:.1f} s: the grace a scheduler gives must cover one optimizer step plus that); "
                         "run the same command again to resume (train.resume=auto)")
        self.step, self.path, self.seconds = step, path, seconds


# the launchers that relay a stop to their ranks and kill them after a fixed grace (both 30 s)
LAUNCHED = ".launched"  # launch.sh marks a launch's start in the run directory (see StopFlag._since)
LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch", "/torchrun")


class StopFlag:
    """Set by the signals of train.exit_signals; read at each optimizer-step boundary (in the step's
    all-reduce, so every rank stops at the same step). The first signal also holds the launcher off
    (`hold_launcher`) until this process exits."""

    def __init__(self, names: list[str], stop_file: str | None = None):
        self.stop_file = stop_file  # <output_dir>/STOP: a stop any rank sees, on any node (launch.sh touches it)
        self.started = self._since()
        self.requested = False
        self.signal = None
        self.held = None  # the launcher's pid while it is paused
        self.signums = [getattr(signal, n if n.startswith("SIG") else "SIG" + n)
                        for n in (n.strip().upper() for n in names) if n]
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.signums}

    def restore(self) -> None:
        """The handlers from before this run (a run in a longer-lived process, e.g. tests, leaves none behind)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _since(self) -> float:
        """The time from which a STOP file counts: launch.sh's <output_dir>/.launched mark, which it touches on
        removing any old STOP before it starts the ranks (both times are the shared file system's, so a stop sent
        while the ranks start up, or by a node whose clock is off, counts); without it, this process's start."""
        if self.stop_file is not None:
            with contextlib.suppress(FileNotFoundError):
                return os.stat(os.path.join(os.path.dirname(self.stop_file), LAUNCHED)).st_mtime
        return time.time()

    def file_seen(self) -> bool:
        """Whether the stop file was touched since this launch started (`_since`; read at each step boundary: one
        stat on the run's shared directory). An older one, left by an earlier launch, does not stop this one."""
        if self.stop_file is None:
            return False
        try:
            return os.stat(self.stop_file).st_mtime >= self.started
        except FileNotFoundError:
            return False

    def finish(self, step: int, path: str, seconds: float) -> None:
        """All ranks, once the checkpoint is saved: ignore late signals (the exit status would become the
        signal's instead of 75), record 75, and wait until every rank has (the first to let its launcher go
        may be followed by the launcher's kill of the others), then raise Preempted. Rank 0 removes the stop
        file, so that the run started again goes on."""
        for signum in self.signums:
            signal.signal(signum, signal.SIG_IGN)
        record_exit(EXIT_PREEMPTED)
        dist.barrier()
        if dist.rank_world()[0] == 0 and self.file_seen():
            os.remove(self.stop_file)
        raise Preempted(step, path, seconds)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"selfaug: {name} again: already stopping (a checkpoint is being saved at the next step "
                  "boundary, then the run exits)", file=sys.stderr, flush=True)
            return
        self.requested, self.signal = True, name
        self.held = hold_launcher()
        held = f"; its launcher (pid {self.held}) is paused until then" if self.held else ""
        print(f"selfaug: {name} received: finishing this optimizer step, then saving a checkpoint and exiting "
              f"({EXIT_PREEMPTED}){held}", file=sys.stderr, flush=True)


def hold_launcher() -> int | None:
    """Pause this process's parent when it is a launcher that would kill it before the checkpoint is written
    (DeepSpeed's launch.py, torchrun: SIGTERM to the ranks, SIGKILL 30 s later), and make sure it is let go
    however this process ends. None when the parent is anything else (a shell, launch.sh, a scheduler's task).

    Two things let it go: an atexit handler (promptly, also after an error), and a watchdog process started
    before the pause, which lets it go once this process has ended: SIGKILL and the OOM killer run no atexit
    handler, and a launcher left paused would hold the job until the scheduler's limit (torchrun's agent would
    also miss its rendezvous heartbeats). The barrier of `StopFlag.finish` still comes first: a rank that saved
    its checkpoint ends only after every rank has recorded 75."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if parent <= 1 or not any(m in a for a in argv[:4] for m in LAUNCHERS):
        return None
    try:
        watchdog = _start_watchdog(parent)
    except OSError as e:  # no pause without the watchdog: a launcher paused forever is worse than its kill
        print(f"selfaug: the launcher (pid {parent}) is not paused, so it may kill this rank 30 s from now, before "
              f"the checkpoint is written: its watchdog could not be started ({e})", file=sys.stderr, flush=True)
        return None
    os.kill(parent, signal.SIGSTOP)
    atexit.register(_let_go, parent, watchdog)
    return parent


# what the watchdog ignores: a stop delivered to the whole job, or relayed by the launcher, is for the ranks
WATCHDOG_IGNORES = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _start_watchdog(launcher: int) -> subprocess.Popen:
    """The watchdog of `hold_launcher`: `_watch` in an interpreter of its own that imports only the standard
    library (fork+exec: this process has threads), given this process as a pidfd where the kernel has them
    (Linux 5.3+; it cannot name another process later, as a pid can). It ignores WATCHDOG_IGNORES from its
    first instruction: a signal ignored at exec stays ignored, so they are ignored here while it starts."""
    try:
        me = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):  # no pidfds: the watchdog reads /proc/PID/stat
        me = -1
    program = "\n".join(inspect.getsource(f) for f in (_has_ended, _watch))
    program += "\nimport sys\n_watch(*map(int, sys.argv[1:]))\n"
    handlers = {s: signal.getsignal(s) for s in WATCHDOG_IGNORES}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # None: set outside Python, left alone
    try:
        for signum in handlers:
            signal.signal(signum, signal.SIG_IGN)
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", program, str(os.getpid()), str(me), str(launcher)],
                                stdin=subprocess.DEVNULL, pass_fds=(me,) if me >= 0 else ())
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if me >= 0:
            os.close(me)


def _let_go(launcher: int, watchdog: subprocess.Popen) -> None:
    """At exit: the launcher goes on, and the watchdog, no longer needed, is ended and reaped (it ignores SIGTERM)."""
    try:
        os.kill(launcher, signal.SIGCONT)
    except ProcessLookupError:
        pass
    watchdog.kill()
    watchdog.wait()


def _watch(rank: int, rank_fd: int, launcher: int) -> None:
    """The watchdog's program (its own interpreter, the standard library only, the stop signals ignored): wait
    until the rank has ended, however it ended, then let its launcher go. The rank is not gone when it dies: it
    stays a zombie until its parent reaps it, and its parent is the paused launcher, so `kill(pid, 0)` still
    succeeds. Its pidfd turns readable at its exit, zombie or not; without one, /proc/PID/stat says Z."""
    import os
    import select
    import signal
    import sys
    import time
    if rank_fd >= 0:
        poller = select.poll()  # not select(): a pidfd's number may be above FD_SETSIZE
        poller.register(rank_fd, select.POLLIN)
        poller.poll()
    else:
        while not _has_ended(rank):
            time.sleep(0.1)
    try:
        os.kill(launcher, signal.SIGCONT)
    except ProcessLookupError:
        return
    print(f"selfaug: rank process {rank} ended without letting its launcher go (killed: SIGKILL, out of memory?); "
          f"its watchdog let the launcher (pid {launcher}) go on", file=sys.stderr, flush=True)


def _has_ended(pid: int) -> bool:
    """Whether process `pid` has exited: a zombie (state Z, or X while it is reaped) or no longer listed."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # the state follows the command name "(...)"


RUN_EXIT_DIR: str | None = None  # the current run's `<output_dir>/.exit` (shared by every node), set by the train stage


def record_exit(code: int) -> None:
    """This rank's exit status, `rank-R-of-W` holding the code, in $SELFAUG_EXIT_DIR (set by launch.sh) and in the
    run's `<output_dir>/.exit/` (what launch.sh reads when the ranks run on other nodes, where the launcher does
    not pass the variable on). The launchers end with their own status (1 when they were signalled), so
    launch.sh reads the ranks'."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    for where in (os.environ.get("SELFAUG_EXIT_DIR"), RUN_EXIT_DIR):
        if where and os.path.isdir(where):
            with open(os.path.join(where, f"rank-{rank}-of-{world}"), "w") as f:
                f.write(f"{code}\n")
