"""Preemption as clusters deliver it (docs/design.md, "Checkpoints and preemption"): the stop signal to
launch.sh alone, to every process of its group at once (SLURM at a time limit, `scancel`), or to the
ranks alone; under launch.sh, the `deepspeed` launcher, torchrun, or as one plain process; on 1 and 2
ranks. Each ends with a checkpoint at a step boundary and every rank exiting 75 (launch.sh itself 75),
and the resumed run ends where an uninterrupted one ends, with every step logged once. A rank killed
during the save (no atexit handler runs) leaves no launcher paused; collectives wait train.ddp_timeout."""
import inspect
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psutil
import pytest
from safetensors.torch import load_file

from conftest import ROOT, clean_env, read_metrics, tiny_config, write_recipe
from selfaug import train
from selfaug.dist import free_port
from selfaug.train import preemption

SGD = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9}
STEPS = 10
SLOW_SAVE_S = 33  # longer than the launchers' grace between their SIGTERM and SIGKILL (30 s)


def _config(tmp_path, tiny_store, run_dir, grad_accum, **train_keys):
    """The same global batch of 4 on any world size: micro 2 x accum 2 on 1 rank, micro 2 on 2 ranks."""
    return tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                       train={**SGD, "max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": grad_accum,
                              "output_dir": str(run_dir), **train_keys})


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "final", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_store):
    tmp = tmp_path_factory.mktemp("whole")
    return _adapter(train.train(_config(tmp, tiny_store, tmp / "run", 2)))


def _command(launcher, nprocs, recipe):
    port = str(free_port())
    return {"launch.sh": [os.path.join(ROOT, "launch.sh"), "train", recipe],
            "deepspeed": [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nprocs),
                          "--master_port", port, "--module", "selfaug", "train", "--config", recipe],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                         "--master_port", port, "-m", "selfaug", "train", "--config", recipe],
            "python": [sys.executable, "-m", "selfaug", "train", "--config", recipe]}[launcher]


def _ranks(pid):
    """The training processes below `pid` (launch.sh -> deepspeed runner -> launch.py -> ranks)."""
    def is_rank(argv):
        return "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["selfaug"]
    ranks = [p for p in psutil.Process(pid).children(recursive=True) if is_rank(p.cmdline())]
    assert ranks
    return ranks


def _deliver(proc, delivery):
    if delivery == "group":  # every process of the job at once, as SLURM and container runtimes do
        os.killpg(proc.pid, signal.SIGTERM)
    elif delivery == "ranks":
        for p in _ranks(proc.pid):
            p.send_signal(signal.SIGTERM)
    else:  # launch.sh alone, or the one plain process
        proc.send_signal(signal.SIGTERM)


def _wait_for_group(pgid, timeout):
    """Until no process of the group is left (a launcher may exit before the ranks it started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes of group {pgid} still running after {timeout} s")


CASES = {  # name: launcher, delivery, ranks, slow save (plus a second signal during the save)
    "launch.sh-alone-2-ranks": ("launch.sh", "launcher", 2, False),
    "launch.sh-group-2-ranks-slow-save": ("launch.sh", "group", 2, True),
    "launch.sh-ranks-alone-2-ranks": ("launch.sh", "ranks", 2, False),
    "deepspeed-group-2-ranks": ("deepspeed", "group", 2, False),
    "torchrun-group-2-ranks": ("torchrun", "group", 2, False),
    "python-1-process": ("python", "process", 1, False),
}
# each command's own exit status: launch.sh reads the ranks'; the `deepspeed` runner dies of the SIGTERM,
# torchrun's agent ends with 1 after a signal
EXIT = {"launch.sh": preemption.EXIT_PREEMPTED, "python": preemption.EXIT_PREEMPTED, "deepspeed": -signal.SIGTERM,
        "torchrun": 1}


@pytest.mark.parametrize("case", list(CASES))
def test_every_delivery_of_the_stop_checkpoints_exits_75_and_resumes_as_uninterrupted(
        tmp_path, tiny_store, uninterrupted, case):
    launcher, delivery, nprocs, slow = CASES[case]
    run_dir, exits = tmp_path / "run", tmp_path / "exit"
    exits.mkdir()
    recipe = write_recipe(str(tmp_path / "r.yaml"), _config(tmp_path, tiny_store, run_dir, 2 // nprocs))
    env = clean_env(NUM_PROCS=str(nprocs), MASTER_PORT=str(free_port()), SELFAUG_EXIT_DIR=str(exits))
    if slow:  # the save takes longer than the launcher waits before its SIGKILL
        env.update(PYTHONPATH=os.path.join(ROOT, "tests", "helpers", "slow_save"), SLOW_SAVE_S=str(SLOW_SAVE_S))
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(_command(launcher, nprocs, recipe), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    _deliver(proc, delivery)
    stopped_at = time.time()
    if delivery != "ranks":
        time.sleep(2 if slow else 0.5)
        _deliver(proc, delivery)  # a second signal while stopping (during the save, when it is slow) changes nothing
    rc = proc.wait(timeout=240)
    _wait_for_group(proc.pid, 120)
    log.seek(0)
    output = log.read()
    assert rc == EXIT[launcher], output[-4000:]
    if launcher != "launch.sh":  # launch.sh reads the ranks' records from a directory of its own
        assert sorted(os.listdir(exits)) == [f"rank-{r}-of-{nprocs}" for r in range(nprocs)], output[-3000:]
        assert all(open(exits / f).read() == "75\n" for f in os.listdir(exits))
    if launcher != "python":  # each rank held its launcher off until its checkpoint was written
        assert output.count("is paused until then") == nprocs, output[-3000:]
    if slow:
        assert time.time() - stopped_at > SLOW_SAVE_S
    stopped = len(read_metrics(run_dir))
    assert 1 <= stopped < STEPS and "received: finishing this optimizer step" in output
    assert f"stopped on request after optimizer step {stopped}" in output and " written in " in output
    assert open(run_dir / "checkpoints" / "latest").read() == f"step-{stopped}" and not (run_dir / "final").exists()
    resumed = train.train(_config(tmp_path, tiny_store, run_dir, 2))  # the rerun, on one rank
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, STEPS + 1))
    final = _adapter(resumed)
    assert final.keys() == uninterrupted.keys()
    for key in final:
        assert (final[key] - uninterrupted[key]).abs().max().item() < 1e-5, key


def test_a_stop_file_touched_while_the_ranks_start_up_counts(tmp_path):
    """launch.sh removes any old STOP and touches .launched before it starts the ranks; a STOP touched after that
    mark stops the run even if it is older than the rank's process (pdsh, ssh and imports take a while on several
    nodes). Without the mark, only a STOP touched after the process started counts."""
    stop, mark, now = tmp_path / "STOP", tmp_path / preemption.LAUNCHED, time.time()
    stop.touch()
    os.utime(stop, (now - 30,) * 2)  # sent while the ranks were starting up
    unmarked = preemption.StopFlag([], str(stop))
    assert not unmarked.file_seen()  # as old as a STOP left by an earlier launch
    mark.touch()
    os.utime(mark, (now - 60,) * 2)
    marked = preemption.StopFlag([], str(stop))
    assert marked.file_seen()
    os.utime(stop, (now - 90,) * 2)  # before this launch: stale
    assert not marked.file_seen()


def test_a_build_lock_left_by_a_killed_process_is_one_line_instead_of_a_hang(tmp_path, monkeypatch):
    """torch waits forever for `<op>/lock`; a process killed while loading an op leaves it behind."""
    from selfaug import dist
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    (op / "shm.o").write_bytes(b"x")
    (op / "lock").touch()
    dist.check_build_locks()  # a build under way: its folder changes
    old = time.time() - dist.STALE_BUILD_LOCK_S - 60
    for f in op.iterdir():
        os.utime(f, (old, old))
    with pytest.raises(dist.DistError, match="deepspeed_shm_comm/lock: nothing in its folder has changed for 11 "
                                             "minutes.*remove it"):
        dist.check_build_locks()
    (op / "lock").unlink()
    dist.check_build_locks()


def test_deepspeeds_cpu_shm_op_is_not_loaded_so_its_build_lock_cannot_hang_a_start(tmp_path):
    """A lock left in `deepspeed_shm_comm/` by a process killed at start-up (fresh: too young to be named as
    stale) would make torch wait forever in DeepSpeed's comm backend; the op is not loaded on the CPU
    accelerator, so a start is untouched by it. Every entry point: selfaug's process group, a 1-process script's
    environment (the benchmarks' workers) and `import selfaug.hf` (before TrainingArguments makes DeepSpeed's
    backend through accelerate), there under a launcher's rank variables."""
    from selfaug.dist import free_port
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    (op / "lock").touch()
    env = clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path))
    launched = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for entry, extra in (("from selfaug import dist; dist.init()", {}),
                         ("from selfaug import dist; dist.ensure_env()", {}),
                         ("import selfaug.hf\nfrom transformers import TrainingArguments\n"
                          f"TrainingArguments({str(tmp_path / 'hf')!r}, use_cpu=True, report_to=[], deepspeed="
                          "{'train_micro_batch_size_per_gpu': 'auto', 'zero_optimization': {'stage': 2}}).device",
                          {**launched, "MASTER_PORT": str(free_port())})):
        code = (f"{entry}\nimport deepspeed\ndeepspeed.init_distributed(dist_backend='gloo')\n"
                "from deepspeed.comm import comm\nassert comm.cdb.shm_comm_op is None\nprint('started')")
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "started" in out.stdout, out.stderr[-3000:]
    assert sorted(p.name for p in op.iterdir()) == ["lock"]  # nothing was built there


def test_train_ddp_timeout_reaches_the_process_group_in_both_stages(tmp_path, monkeypatch):
    """torch's NCCL default (10 minutes) is shorter than waits that are normal here: train.ddp_timeout goes to
    torch.distributed's process group (`dist.init`) and to `deepspeed.init_distributed`, in stage 1 and 2."""
    import deepspeed
    import torch.distributed
    from selfaug import dist, precompute

    class Reached(Exception):
        pass
    got = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: got.append(timeout))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.init(90) == (0, 2) and got == [timedelta(seconds=90)]
    assert inspect.signature(dist.init).parameters["timeout_s"].default == 3600  # a plain dist.init()

    def reached(*args, timeout, **kwargs):
        got.append(timeout)
        raise Reached
    monkeypatch.setattr(dist, "init", lambda timeout_s: got.append(timeout_s) or (0, 1))
    monkeypatch.setattr(deepspeed, "init_distributed", reached)
    cfg = tiny_config(str(tmp_path), train={"ddp_timeout": 7200},
                      teacher={"deepspeed": os.path.join(ROOT, "ds_configs", "zero3_inference.json")})
    for stage in (precompute.run, train.setup):
        got.clear()
        with pytest.raises(Reached):
            stage(cfg)
        assert got == [7200, timedelta(seconds=7200)], stage


def test_a_phase_rank_0_runs_alone_says_how_long_the_others_wait(monkeypatch, capsys):
    from selfaug import dist
    line = "rank 0 merges the adapter; the other ranks wait at a barrier (up to train.ddp_timeout = 60 min)"
    for rank, world, printed in ((0, 2, line), (1, 2, ""), (0, 1, "")):
        monkeypatch.setattr(dist, "rank_world", lambda: (rank, world))
        assert dist.alone("merges the adapter", 3600) == (line if world > 1 else None)
        assert capsys.readouterr().out.strip() == printed


# ---- the launcher is let go however a rank ends -------------------------------------------------------------

LAUNCHER = """import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[2]])  # argv[1] names torchrun: hold_launcher pauses this
sys.exit(rank.wait() & 0xFF)
"""
RANK = """import os, sys, time
sys.path.insert(0, {root!r})
from selfaug.train import preemption
if {no_pidfd}:
    del os.pidfd_open  # an older kernel: the watchdog reads /proc/PID/stat
print(preemption.hold_launcher(), flush=True)
time.sleep({sleep})
"""


def _state(pid):
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def _until(check, timeout):
    deadline = time.time() + timeout
    while not check() and time.time() < deadline:
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("end,no_pidfd", [("sigkill", False), ("sigkill", True), ("exit", False)])
def test_the_paused_launcher_goes_on_however_the_rank_ends(tmp_path, end, no_pidfd):
    """A stand-in launcher (its argv names torch.distributed.run) whose one rank pauses it. SIGKILL runs no atexit
    handler, and the killed rank stays a zombie while its paused parent cannot reap it: the watchdog still lets
    the launcher go, within a second. A rank that exits lets it go itself and leaves no watchdog behind."""
    rank_code = RANK.format(root=ROOT, no_pidfd=no_pidfd, sleep=60 if end == "sigkill" else 1)
    log = open(tmp_path / "log", "w+")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, "torch.distributed.run", rank_code], cwd=ROOT,
                                env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _until(lambda: _state(launcher.pid) == psutil.STATUS_STOPPED, 60), open(tmp_path / "log").read()
        rank = psutil.Process(launcher.pid).children()[0]
        watchdogs = [p for p in rank.children() if any("_watch(" in a for a in p.cmdline())]
        for w in watchdogs:  # the stop, or the launcher's relay of it, reaches the watchdog too
            w.send_signal(signal.SIGTERM)
            w.send_signal(signal.SIGINT)
        if end == "sigkill":
            rank.kill()
        assert _until(lambda: _state(launcher.pid) != psutil.STATUS_STOPPED, 1 + (end == "exit")), "still paused"
        assert launcher.wait(timeout=10) == (-signal.SIGKILL & 0xFF if end == "sigkill" else 0)
        assert len(watchdogs) == 1
        assert _until(lambda: _state(watchdogs[0].pid) == "gone", 5), _state(watchdogs[0].pid)  # nor a zombie
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True) if launcher.poll() is None else []:
            p.kill()
        launcher.kill()
        launcher.wait()
    log.seek(0)
    output = log.read()
    assert output.splitlines()[0] == str(launcher.pid)
    assert ("its watchdog let the launcher" in output) == (end == "sigkill"), output


KILLED_SAVE_S = 8  # the slowed save during which a rank is killed: long enough to tell a paused launcher apart


def test_a_rank_killed_during_the_save_leaves_no_launcher_paused(tmp_path, tiny_store):
    """torchrun, 2 ranks, the stop to the whole group; during the (slowed) save one rank is SIGKILLed, as the
    OOM killer would end it: no atexit handler runs. Its watchdog lets the agent go at once (with the atexit
    handler alone the agent stayed paused until the other rank's save failed: with NCCL, at the collective
    timeout), the job ends non-zero within seconds, nothing of it is left running, and checkpoints/latest
    still names the checkpoint before the stop."""
    run_dir = tmp_path / "run"
    train.train(_config(tmp_path, tiny_store, run_dir, 2), stop_after=1)  # the checkpoint before: step-1
    recipe = write_recipe(str(tmp_path / "r.yaml"), _config(tmp_path, tiny_store, run_dir, 1))
    env = clean_env(PYTHONPATH=os.path.join(ROOT, "tests", "helpers", "slow_save"), SLOW_SAVE_S=str(KILLED_SAVE_S))
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(_command("torchrun", 2, recipe), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    agent = psutil.Process(proc.pid)
    metrics = run_dir / "metrics.jsonl"

    def rows():
        return metrics.read_text().count("\n")
    try:
        assert _until(lambda: rows() >= 2 or proc.poll() is not None, 240) and proc.poll() is None, \
            log.seek(0) or log.read()[-3000:]
        _deliver(proc, "group")
        assert _until(lambda: agent.status() == psutil.STATUS_STOPPED, 30)  # paused by its ranks
        seen = rows()
        while _until(lambda: rows() != seen, 2):  # until no step for 2 s: the ranks are in the slowed save
            seen = rows()
        processes = agent.children(recursive=True)  # the ranks and their watchdogs
        assert sum(any("_watch(" in a for a in p.cmdline()) for p in processes) == 2
        next(p for p in _ranks(proc.pid) if p.environ().get("RANK") == "1").kill()
        killed_at = time.time()
        assert _until(lambda: agent.status() != psutil.STATUS_STOPPED, 2), "the agent is still paused"
        rc = proc.wait(timeout=60)
        ended = time.time() - killed_at
    finally:
        for p in agent.children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait()
    log.seek(0)
    output = log.read()
    assert rc != 0 and ended < KILLED_SAVE_S + 20, (rc, ended)  # rank 0 fails once its save reaches rank 1
    assert all(_until(lambda: _state(p.pid) == "gone", 10) for p in processes)  # none running, none a zombie
    assert "its watchdog let the launcher" in output, output[-3000:]
    assert open(run_dir / "checkpoints" / "latest").read() == "step-1"
