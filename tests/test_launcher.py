"""`selfaug launch` (launch.sh runs it): from the user's directory, with every path resolved there; and no code from
data: the multi-node command line that DeepSpeed's pdsh runner builds (`python -m selfaug.runner`), parsed by a
shell as a node's shell parses it: values holding `$(...)` and backticks arrive as they were given and run
nothing."""
import os
import re
import shutil
import subprocess
import sys
from shlex import split

from conftest import ROOT, clean_env, read_metrics, tiny_config, write_recipe
from deepspeed.launcher import runner
from selfaug.launcher import STAGES, runner_command
from selfaug.runner import QuotedPDSHRunner


def _remote_words(tmp_path, runner_cls, values: list[str]) -> list[str]:
    """The words a node's shell makes of the remote command `runner_cls.get_cmd` builds (pdsh joins the words
    after its own flags with spaces and hands them to the node's shell), with the launch program replaced by
    printf: nothing is started."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = runner.parse_args(["--hostfile", str(hostfile), "--master_port", "29500", "--module", "selfaug", "train",
                              "--config", *values])
    cmd, _, _ = runner_cls(args, "d29ybGQ=").get_cmd({}, {"node-a": [0], "node-b": [0]})
    remote = " ".join(cmd[6 + len(split(args.launcher_args)):])  # after: pdsh -S -f N -w HOSTS [launcher_args]
    remote = remote.replace(f"{sys.executable} -u -m deepspeed.launcher.launch", "printf '%s\\0'")
    out = subprocess.run(["sh", "-c", remote], capture_output=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().split("\0")[:-1]


def test_every_argument_reaching_a_nodes_shell_is_quoted(tmp_path, monkeypatch):
    ran = tmp_path / "ran"
    values = [f"runs/s$(touch {ran}-dollar)", f"study.output_dir=runs/`touch {ran}-backtick`",
              f"train.output_dir=a b $(touch {ran}-spaced) \"q\" 'single'", "x;touch${IFS}" + f"{ran}-semicolon",
              "$HOME", "*"]
    here = tmp_path / "a dir $(touch ran-cd)"
    here.mkdir()
    monkeypatch.chdir(here)  # the runner cds into the working directory on every node
    words = _remote_words(tmp_path, QuotedPDSHRunner, values)
    assert words[-len(values) - 3:] == ["selfaug", "train", "--config", *values]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ran")] and not os.listdir(here)
    # `selfaug launch` (and launch.sh through it) starts the runner this way
    assert runner_command("train", "r.yaml", [])[0][:3] == [sys.executable, "-m", "selfaug.runner"]


def test_selfaug_launch_runs_from_the_users_directory_with_paths_resolved_there(tmp_path):
    """`selfaug launch train RECIPE` from a directory outside the clone, with the installed command: the recipe, its
    DeepSpeed config and its output directory are relative paths, resolved against the caller's directory (launch.sh
    used to `cd` into the clone, where `recipe.yaml` is not)."""
    shutil.copyfile(os.path.join(ROOT, "ds_configs", "zero2.json"), tmp_path / "my_zero.json")
    cfg = tiny_config(".", train={"teacher_mode": "none", "alpha": 0, "max_steps": 2, "deepspeed": "my_zero.json"})
    write_recipe(str(tmp_path / "recipe.yaml"), cfg)
    exe = os.path.join(os.path.dirname(sys.executable), "selfaug")
    # no `deepspeed` command on PATH (install.md promised a fallback to one): the runner comes from this Python
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != os.path.dirname(sys.executable))
    assert shutil.which("deepspeed", path=path) is None
    out = subprocess.run([exe, "launch", "train", "recipe.yaml", "train.output_dir=my-run"], cwd=tmp_path,
                         env=clean_env(NUM_PROCS="1", PATH=path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "-m selfaug.runner" in out.stderr  # through DeepSpeed's runner, as on a cluster
    assert [r["step"] for r in read_metrics(tmp_path / "my-run")] == [1, 2]
    assert os.path.isfile(tmp_path / "my-run" / "final" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "my-run" / ".launched") and not os.path.exists(os.path.join(ROOT, "my-run"))
    # every shipped recipe's command is one a pip-installed user has (no ./launch.sh first)
    listed = subprocess.run([exe, "recipes"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True).stdout
    for line in [line for line in listed.splitlines() if line.startswith("recipes/") and "accelerate" not in line]:
        name, about = line.split(None, 1)
        assert re.match(rf"(\S+=\S+ )*selfaug launch ({'|'.join(STAGES)}) {re.escape(name)}\b", about), line
    # a mistake is one line before anything starts
    out = subprocess.run([exe, "launch", "train", "missing.yaml"], cwd=tmp_path, env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "missing.yaml" in out.stderr, out.stderr
