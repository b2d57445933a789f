"""No code from data: the multi-node command line that DeepSpeed's pdsh runner builds, as launch.sh runs it
(`python -m selfaug.launcher`), parsed by a shell as a node's shell parses it: values holding `$(...)` and
backticks arrive as they were given and run nothing."""
import os
import subprocess
import sys
from shlex import split

from conftest import ROOT
from deepspeed.launcher import runner
from selfaug.launcher import QuotedPDSHRunner


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
    # launch.sh starts the runner this way (its other launches take the same module)
    assert '"$PY" -m selfaug.launcher "${args[@]}"' in open(os.path.join(ROOT, "launch.sh")).read()
