"""One job per directory: a second `selfaug train`, `eval` or `study` (or `launch.sh train`) on a directory another
job holds is refused in one line naming the holder and changes nothing there; a lock whose holder is gone is
taken over; train.resume=never over a run needs train.overwrite."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env, one_line as _one_line, read_metrics, tiny_config, write_recipe
from selfaug import train
from selfaug.cli import main
from selfaug.train.checkpoint import CheckpointError

PLAIN = {"max_steps": 1, "teacher_mode": "none", "alpha": 0}  # no store needed
HOLD = "import sys; from selfaug.locks import DirLock; DirLock(sys.argv[1], sys.argv[2]).acquire(); print('held', " \
       "flush=True); sys.stdin.read()"


def _holder(directory, job):
    """Another process holding `directory` as `job` would, until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, directory, job], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def _files(directory):
    """Every file under `directory` with its bytes and mtime."""
    return {os.path.join(d, f): (open(os.path.join(d, f), "rb").read(), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, names in os.walk(directory) for f in names}


def _a_run_in(out):
    """What a running run has written: metrics, a checkpoint named latest, a rank's exit record, a STOP."""
    os.makedirs(os.path.join(out, "checkpoints", "step-1"))
    os.makedirs(os.path.join(out, ".exit"))
    for name, text in (("metrics.jsonl", '{"step": 1, "loss": 1.0}\n'), ("checkpoints/latest", "step-1"),
                       (".exit/rank-0-of-1", "75\n"), ("STOP", "")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def test_a_second_train_on_a_held_directory_is_refused_and_changes_nothing(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path), train=PLAIN)
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    out = cfg.train.output_dir
    _a_run_in(out)
    first = _holder(out, "train")
    try:
        before = _files(out)
        line = _one_line(capsys, ["train", "--config", recipe], f"{out} is in use by another job (selfaug train on host")
        assert f"pid {first.pid}, since" in line
        # launch.sh refuses before it removes the run's STOP and .exit records or marks its own launch
        got = subprocess.run([os.path.join(ROOT, "launch.sh"), "train", recipe], cwd=ROOT, capture_output=True,
                             text=True, env=clean_env(SELFAUG_PYTHON=sys.executable))
        assert got.returncode == 2 and f"{out} is in use by another job (selfaug train" in got.stderr, got.stderr
        assert _files(out) == before
    finally:
        first.communicate("")  # its end releases the lock
    # the holder is gone: its lock is taken over; resume=never over the run it left is refused without overwrite
    _one_line(capsys, ["train", "--config", recipe, "train.resume=never"], "holds a run")
    assert _files(out) == {**before, os.path.join(out, ".lock"): _files(out)[os.path.join(out, ".lock")]}
    train.train(tiny_config(str(tmp_path), train={**PLAIN, "resume": "never", "overwrite": True}))
    assert "taking over the stale lock" not in capsys.readouterr().out  # released by the refused run
    assert [r["step"] for r in read_metrics(out)] == [1] and read_metrics(out)[0]["loss"] != 1.0
    assert not os.path.exists(os.path.join(out, "checkpoints", "latest"))  # the old run's is gone


@pytest.mark.parametrize("command", ["eval", "study"])
def test_a_second_eval_or_study_is_refused(tmp_path, capsys, command):
    cfg = tiny_config(str(tmp_path), eval={"runs": []})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    where = getattr(cfg, command).output_dir
    first = _holder(where, command)
    try:
        _one_line(capsys, [command, "--config", recipe], f"{where} is in use by another job (selfaug {command} on")
    finally:
        first.communicate("")


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path), train={"max_steps": 1})
    os.makedirs(cfg.train.output_dir)
    with open(os.path.join(cfg.train.output_dir, ".lock"), "w") as f:
        f.write("selfaug train on host gone, pid 999999, since 2026-01-01 00:00:00")  # no flock: its holder died
    _a_run_in(cfg.train.output_dir)
    with pytest.raises(CheckpointError, match="holds a run"):
        train.train(tiny_config(str(tmp_path), train={"resume": "never"}))
    assert "taking over the stale lock of" in capsys.readouterr().out
