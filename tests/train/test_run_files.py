"""No code from a run's own files: the RNG state is tensors and plain values, read with weights_only=True (a
pickle there is never run), saved per device and restored for the devices a process sees; `checkpoints/latest`
names a checkpoint inside checkpoints/ or the resume is refused in one line."""
import os
import random

import numpy as np
import pytest
import torch

from conftest import read_metrics, tiny_config, write_recipe
from selfaug import train
from selfaug.cli import main
from selfaug.train import checkpoint

PLAIN = {"teacher_mode": "none", "alpha": 0, "max_steps": 2, "save_steps": 1}


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_the_rng_state_is_tensors_and_restores_the_devices_a_process_sees(tmp_path, capsys):
    path = tmp_path / "rng.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = _draws()
    state = torch.load(path, weights_only=True)
    state["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # written where the process saw 2 GPUs
    checkpoint.set_rng_state(state, cuda_devices=0)  # resumed where it sees none (or, alike, fewer)
    assert _draws() == expected
    assert "holds the CUDA RNG states of 2 devices and this process sees 0: those of devices 0-1 are not " \
           "restored" in capsys.readouterr().out


class _Code:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return open, (self.marker, "w")


def test_a_pickle_in_the_runs_files_is_never_run(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path), train=PLAIN)
    train.train(tiny_config(str(tmp_path), train={**PLAIN, "max_steps": 1}))
    marker = tmp_path / "ran"
    torch.save({"python": _Code(str(marker))}, os.path.join(cfg.train.output_dir, "checkpoints", "step-1", "rng_rank0.pt"))
    train.train(cfg)
    assert not marker.exists() and "holds more than tensors and plain values" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(cfg.train.output_dir)] == [1, 2]


@pytest.mark.parametrize("tag", ["../../elsewhere", "/tmp", "..", "step-9", "linked"])
def test_latest_must_name_a_checkpoint_inside_checkpoints(tmp_path, capsys, tag):
    cfg = tiny_config(str(tmp_path), train=PLAIN)
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    os.makedirs(os.path.join(str(tmp_path), "elsewhere"))
    os.makedirs(root)
    os.symlink(os.path.join(str(tmp_path), "elsewhere"), os.path.join(root, "linked"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)
    code = main(["train", "--config", write_recipe(str(tmp_path / "r.yaml"), cfg)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("selfaug: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"latest names {tag!r}, which is not a checkpoint directory inside {root}" in lines[0]
