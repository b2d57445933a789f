"""Gradient accumulation on every ZeRO stage: one micro-batch of 4 per step and two of 2 are the same step.

DeepSpeed divides by the accumulation steps in two places: `engine.backward(scale_wrt_gas=True)` and a hook on
the forward's outputs that skips its division only when backward's own loss tensor is a new one. ZeRO-2/3's
optimizer makes a new tensor (its loss scale); ZeRO-0 and ZeRO-1 in bf16 do not, so a loss handed to backward
as it came out of forward was divided by the accumulation steps there, a gradient 1/accum of the right one.
Each stage is compared with a plain fp32 reference (ZeRO-2, one micro-batch per step), on the adapter."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_config
from selfaug import precompute, train

sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from hf_train import hf_run  # noqa: E402

SGD = {"optim": "sgd", "learning_rate": 4.0, "min_lr_ratio": 1.0, "max_grad_norm": 1e9, "max_steps": 2, "alpha": 0.5,
       "adapter": "lora", "loss_chunk_rows": 64}
STAGES = {  # the ZeRO stage, and the weights' dtype (ZeRO-1 runs DeepSpeed's BF16_Optimizer in bf16)
    "zero0": (0, "float32"), "zero0-bf16": (0, "bfloat16"), "zero1": (1, "float32"), "zero1-bf16": (1, "bfloat16"),
    "zero2": (2, "float32"), "zero3": (3, "float32"),
}


def ds_config(tmp, stage: int) -> str:
    """The shipped config of the stage (ZeRO-1: zero2.json at stage 1)."""
    if stage != 1:
        return os.path.join(ROOT, "ds_configs", f"zero{stage}.json")
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        conf = json.load(f)
    conf["zero_optimization"]["stage"] = 1
    path = os.path.join(tmp, f"zero{stage}.json")
    with open(path, "w") as f:
        json.dump(conf, f)
    return path


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accum")
    cfg = tiny_config(str(tmp), teacher={"value_dtype": "float32"})
    precompute.run(cfg)
    return cfg


def _recipe(tmp, store_cfg, name, stage, dtype, micro, accum):
    return tiny_config(str(tmp), model={"dtype": dtype}, teacher={"value_dtype": "float32",
                                                                 "output_dir": store_cfg.teacher.output_dir},
                      train={**SGD, "output_dir": str(tmp / name), "deepspeed": ds_config(str(tmp), stage),
                             "micro_batch_size": micro, "gradient_accumulation_steps": accum})


def _adapter(tmp, store_cfg, name, stage, dtype, micro, accum):
    run = train.train(_recipe(tmp, store_cfg, name, stage, dtype, micro, accum))
    return load_file(os.path.join(run, "final", "adapter_model.safetensors"))


def _assert_same_step(reference, got, tol, case):
    for k in reference:
        if "lora_B" not in k:
            continue  # lora_A moves only through B, which starts at 0: B carries the step's size
        ref, new = reference[k].float(), got[k].float()
        assert ref.abs().max() > 0
        err = ((new - ref).norm() / ref.norm()).item()
        assert err < tol, f"{case} {k}: relative error {err:.3g} (the update is {new.norm() / ref.norm():.3f}x)"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store_cfg):
    """The adapter after 2 SGD steps of 4 examples each, one micro-batch per step, ZeRO-2 in fp32."""
    return _adapter(tmp_path_factory.mktemp("ref"), store_cfg, "ref", 2, "float32", 4, 1)


@pytest.mark.parametrize("case", list(STAGES))
def test_two_micro_batches_of_two_are_one_of_four_on_every_zero_stage(tmp_path, store_cfg, reference, case):
    stage, dtype = STAGES[case]
    got = _adapter(tmp_path, store_cfg, case, stage, dtype, 2, 2)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: the forward's rounding, far below a factor of 2
    _assert_same_step(reference, got, tol, case)


def test_the_trainer_on_zero0_accumulates_as_selfaug_train(tmp_path, store_cfg, reference):
    """SelfAugTrainer under DeepSpeed: transformers passes its loss to engine.backward(scale_wrt_gas=False)."""
    cfg = _recipe(tmp_path, store_cfg, "hf", 0, "float32", 2, 2)
    recipe = str(tmp_path / "hf.yaml")
    cfg.save(recipe)
    hf_run(recipe, str(tmp_path / "hf"))
    _assert_same_step(reference, load_file(str(tmp_path / "hf" / "final" / "adapter_model.safetensors")), 1e-5, "hf")
