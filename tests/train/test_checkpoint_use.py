"""Checkpoints one can use and rotate: with train.save_hf each `checkpoints/step-N/hf/` is the step's adapter in
peft's form (equal to the DeepSpeed state of that step) and `selfaug eval` loads `RUN/checkpoints/step-N`;
train.save_total_limit keeps exactly N checkpoints, never latest's target, removing only after `latest` moved."""
import os

import pytest
import torch

from conftest import tiny_config
from selfaug import train
from selfaug.config import ConfigError
from selfaug.eval.evaluate import _run_source, load_run_model
from selfaug.models import load_model
from selfaug.train import retention

PLAIN = {"teacher_mode": "none", "alpha": 0, "max_steps": 3, "save_steps": 1}


def _lora(model) -> dict:
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_each_checkpoint_holds_its_adapter_for_peft_and_eval_and_the_oldest_go(tmp_path):
    from peft import PeftModel
    cfg = tiny_config(str(tmp_path), train={**PLAIN, "save_hf": True, "save_total_limit": 2})
    out = train.train(cfg)
    root = os.path.join(out, "checkpoints")
    assert retention.checkpoints(root) == ["step-2", "step-3"]  # exactly 2, the newest, latest among them
    assert open(os.path.join(root, "latest")).read().strip() == "step-3"
    step2 = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), os.path.join(root, "step-2", "hf"))
    # the adapter of step 2 is DeepSpeed's state of step 2 (fp32 on the CPU: the values themselves)
    states = torch.load(os.path.join(root, "step-2", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    ds = {n.removeprefix("model.base_model.model.").replace(".default", ""): v for n, v in states.items()}
    got = {n.replace(".default", ""): v for n, v in _lora(step2).items()}
    assert got.keys() == ds.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], ds[name], rtol=0, atol=0)
    # the last checkpoint's adapter is final/'s; step 2's is another (the weights moved)
    step3 = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), os.path.join(root, "step-3", "hf"))
    final = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), os.path.join(out, "final"))
    a, b, c = _lora(step3), _lora(final), _lora(step2)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    # selfaug eval takes RUN/checkpoints/step-N: the adapter on its base, unmerged
    model, alpha = load_run_model(cfg, os.path.join(root, "step-2"), torch.float32, torch.device("cpu"))
    assert isinstance(model, PeftModel) and alpha == 0
    assert all(torch.equal(v, c[n]) for n, v in _lora(model).items())


def test_a_checkpoint_without_its_hf_form_is_one_line_for_eval(tmp_path):
    cfg = tiny_config(str(tmp_path), train={**PLAIN, "max_steps": 1})
    out = train.train(cfg)
    with pytest.raises(ConfigError, match="checkpoint without its Hugging Face form .*train.save_hf=true"):
        _run_source(os.path.join(out, "checkpoints", "step-1"))


def test_rotation_keeps_exactly_n_and_always_latest(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 10, 11):
        os.makedirs(os.path.join(root, f"step-{step}", "x"))
    os.makedirs(os.path.join(root, "step-7.removing"))  # a removal that was killed half-way
    # latest names an older checkpoint (train.resume=DIR from it): it stays, with the newest others
    assert retention.rotate(root, 3, "step-2") == ["step-1", "step-3"]
    assert sorted(os.listdir(root)) == ["step-10", "step-11", "step-2"]
    assert retention.rotate(root, 1, "step-2") == ["step-10", "step-11"]
    assert os.listdir(root) == ["step-2"]
    assert retention.rotate(root, None, "step-2") == [] and os.listdir(root) == ["step-2"]


def test_a_full_fine_tuning_checkpoint_holds_the_model_for_transformers_and_eval(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(str(tmp_path), train={**PLAIN, "max_steps": 2, "adapter": "none", "save_hf": True,
                                            "save_total_limit": 1})
    out = train.train(cfg)
    hf = os.path.join(out, "checkpoints", "step-2", "hf")
    assert retention.checkpoints(os.path.join(out, "checkpoints")) == ["step-2"]
    got, final = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(out, "final", "model.safetensors"))
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in got)
    assert isinstance(AutoModelForCausalLM.from_pretrained(hf), torch.nn.Module)
    model, _ = load_run_model(cfg, os.path.dirname(hf), torch.float32, torch.device("cpu"))
    assert not hasattr(model, "peft_config")
