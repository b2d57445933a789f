"""Edges a GPU run meets and a CPU can show: a sampled draw at a uniform of 1.0 after fp32 rounding, the dtype a
partitioned teacher is built in, and SelfAugTrainer under DataParallel (a plain `python script.py` on several
GPUs)."""
import os

import pytest
import torch
from transformers import TrainingArguments

from conftest import ROOT, tiny_config
from selfaug.dist import DistError
from selfaug.precompute import teacher_ds_config
from selfaug.store.signals import inverse_cdf_draws


def test_a_uniform_that_rounds_to_one_draws_the_last_token_with_probability():
    """The last two ids have probability 0 (a dead token): a uniform of 1.0 (a float64 just under 1, rounded to
    fp32) must still draw an id with mass, never V or a clamped dead id."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]])
    logp = torch.log(p)
    uniforms = torch.tensor([[1.0 - 2.0 ** -60, 1.0, 0.0, 0.49999]], dtype=torch.float64)
    assert uniforms.float()[0, 0] == 1.0  # what the fp32 cast makes of it
    got = inverse_cdf_draws(logp, uniforms)
    assert got["sample_ids"].tolist() == [[0, 0, 2, 2]]
    assert torch.isfinite(got["sample_logprobs"]).all()


@pytest.mark.parametrize("dtype,section", [("float16", "fp16"), ("bfloat16", "bf16"), ("float32", None)])
def test_a_partitioned_teacher_is_built_in_its_dtype(tmp_path, dtype, section):
    inference = os.path.join(ROOT, "ds_configs", "zero3_inference.json")
    cfg = tiny_config(str(tmp_path), model={"dtype": dtype}, teacher={"deepspeed": inference})
    for device in ("cuda", "cpu"):
        conf = teacher_ds_config(cfg, torch.device(device))
        assert conf["fp16"]["enabled"] == (section == "fp16") and conf["bf16"]["enabled"] == (section == "bf16")


def test_a_teacher_config_that_ignores_the_dtype_is_one_line(tmp_path):
    path = tmp_path / "z3.json"
    path.write_text('{"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}')  # no fp16 section
    cfg = tiny_config(str(tmp_path), model={"dtype": "float16"}, teacher={"deepspeed": str(path)})
    with pytest.raises(DistError, match=r"model.dtype=float16 .* fp16 section says enabled=False.*\"fp16\": "
                                        r"\{\"enabled\": \"auto\"\}"):
        teacher_ds_config(cfg, torch.device("cuda"))


class TwoGPUArguments(TrainingArguments):
    """What TrainingArguments reports in one process that sees two GPUs (n_gpu is computed from the devices)."""

    @property
    def n_gpu(self):
        return 2


def test_data_parallel_is_refused_in_one_line(tmp_path, tiny_store):
    from selfaug.hf import SelfAugTrainer
    from selfaug.models import load_model
    from selfaug.train import TrainError
    args = TwoGPUArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[])
    with pytest.raises(TrainError, match="one process sees 2 GPUs.*torchrun --nproc_per_node 2"):
        SelfAugTrainer(model=load_model("builtin:tiny-llama"), args=args, teacher_store=tiny_store.teacher.output_dir)
