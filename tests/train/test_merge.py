"""A LoRA update is never folded in low precision: `selfaug eval` runs the adapter unmerged, and `selfaug merge` /
`train.merge_adapter` merge in fp32, the base streamed one safetensors file at a time, cast once, with the loss of
that cast stated. The update here is ~1e-4 of the weights: under half a bf16 ulp of nearly every element, so peft's
in-place bf16 merge rounds nearly all of it back to the base."""
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import tiny_config
from selfaug.cli import main
from selfaug.eval.evaluate import load_run_model
from selfaug.models import TINY_LLAMA, load_model, load_tokenizer
from selfaug.train import lora_config
from selfaug.train.merge import MERGE_REPORT

TARGET = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base directory in bf16 (its weights on the bf16 grid, as a real checkpoint's are) and a run whose final/
    holds a LoRA adapter with an update ~1e-4 the size of each weight."""
    tmp = tmp_path_factory.mktemp("merge")
    base_dir = str(tmp / "base")
    load_model(TINY_LLAMA, torch.bfloat16).save_pretrained(base_dir)
    load_tokenizer(TINY_LLAMA).save_pretrained(base_dir)
    cfg = tiny_config(str(tmp), model={"name_or_path": base_dir, "dtype": "bfloat16"}, train={"adapter": "lora"})
    model = get_peft_model(load_model(cfg.model, torch.float32), lora_config(cfg.train))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
                b.normal_()
                b.mul_(1e-4 * module.base_layer.weight.norm() / ((b @ a) * module.scaling["default"]).norm())
    final = os.path.join(cfg.train.output_dir, "final")
    model.save_pretrained(final)
    cfg.save(os.path.join(final, "selfaug_config.yaml"))
    return cfg, base_dir, final


def _exact(base_dir, final):
    """(the base weight, the exact update) of TARGET in fp32."""
    base = load_file(os.path.join(base_dir, "model.safetensors"))[TARGET].float()
    ad = load_file(os.path.join(final, "adapter_model.safetensors"))
    conf = json.load(open(os.path.join(final, "adapter_config.json")))
    key = "base_model.model." + TARGET.removesuffix(".weight")
    update = ad[key + ".lora_B.weight"].float() @ ad[key + ".lora_A.weight"].float() * conf["lora_alpha"] / conf["r"]
    return base, update


def test_the_evaluated_model_carries_an_update_under_half_a_bf16_ulp(run):
    cfg, base_dir, final = run
    base, update = _exact(base_dir, final)
    merged_in_place = (base.bfloat16() + update.bfloat16()).float() - base  # what peft's bf16 merge keeps
    assert (merged_in_place == 0).float().mean() > 0.9  # the update is under half an ulp almost everywhere
    model, _ = load_run_model(cfg, cfg.train.output_dir, torch.bfloat16, "cpu")
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = hf.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    assert weight.dtype == torch.bfloat16
    carried = weight.float() - base  # what a merge kept (0 unmerged: the base as stored)
    if hasattr(layer, "lora_B"):  # the adapter's own matrices
        carried += (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    assert torch.allclose(carried, update, rtol=1e-5, atol=1e-12), (carried - update).abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_selfaug_merge_folds_in_fp32_and_states_what_the_cast_lost(run, dtype, capsys):
    cfg, base_dir, final = run
    out = os.path.join(os.path.dirname(final), f"merged-{dtype}")
    assert main(["merge", cfg.train.output_dir, "--dtype", dtype, "--out", out]) == 0
    line = capsys.readouterr().out
    report = json.load(open(os.path.join(out, MERGE_REPORT)))
    base, update = _exact(base_dir, final)
    saved = load_file(os.path.join(out, "model.safetensors"))[TARGET]
    assert saved.dtype == getattr(torch, dtype)
    # the reference: peft's own merge of an fp32 copy of the base
    reference = PeftModel.from_pretrained(load_model(cfg.model, torch.float32), final).merge_and_unload()
    ref = reference.state_dict()[TARGET]
    if dtype == "float32":
        assert torch.allclose(saved, ref, rtol=0, atol=1e-9)
        assert ((saved - base - update).norm() / update.norm()) < 2e-3  # fp32's own rounding of base + update
        assert report["update_relative_error"] < 1e-3 and "float32" in line
    else:
        assert torch.equal(saved, ref.bfloat16())  # one rounding, of the fp32 merge
        assert report["update_relative_error"] > 0.5 and report["update_elements_rounded_to_base"] > 0
        assert "rounded back to the base" in line and "--dtype float32" in line
    merged = load_model(cfg.model.__class__(name_or_path=out), getattr(torch, dtype))  # transformers reads it
    assert torch.equal(merged.state_dict()[TARGET], saved)
