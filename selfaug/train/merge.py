"""A LoRA adapter merged into its base (docs/design.md, "Checkpoints and preemption"): `selfaug merge RUN` and
`train.merge_adapter` (final/merged).

Never in low precision: peft merges in place in the weight's dtype, and a bf16 base weight is already on the bf16
grid, so every element of the update under half an ulp rounds back to the base (most of a small LoRA update). Here
each targeted weight is merged in fp32, W + scaling * B @ A, and cast once to the output dtype; what that one cast
loses of the update is measured and stated (`merge_report.json`). The base is streamed one safetensors file at a
time, so no process holds more than one file of it (a 70B base is never whole in host memory); a base without
safetensors files (a random-init or built-in tiny model) is merged in memory, the same way.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..durable import replace_dir, staging_dir
from ..errors import SelfAugError
from ..models import config_of, load_model, resolve_source

MERGE_REPORT = "merge_report.json"
PREFIX = "base_model.model."  # peft's prefix of the adapter's tensor names


class MergeError(SelfAugError, ValueError):
    """An adapter this merge cannot fold exactly (DoRA, per-module ranks, an unmatched module)."""


def lora_updates(adapter_dir: str) -> tuple[dict, dict]:
    """({base weight name: (A (r, in), B (out, r), scaling)} in fp32, the adapter's config) of a peft LoRA directory."""
    from safetensors.torch import load_file
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        conf = json.load(f)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out")
                   if conf.get(k)]
    if conf.get("peft_type", "LORA") != "LORA" or unsupported:
        raise MergeError(f"{adapter_dir}: the adapter sets {', '.join(unsupported) or conf.get('peft_type')}, which "
                         "`selfaug merge` does not fold; evaluate it unmerged (selfaug eval loads adapters as they are)")
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    r = conf["r"]
    scaling = conf["lora_alpha"] / (r ** 0.5 if conf.get("use_rslora") else r)
    updates = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight"):
                raise MergeError(f"{adapter_dir}: {name} is not a LoRA matrix of a linear layer; evaluate the adapter "
                                 "unmerged")
            continue
        module = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        updates[module + ".weight"] = (a.float(), b.float(), scaling)
    return updates, conf


class UpdateKept:
    """How much of the LoRA update the cast to the output dtype kept: sums over every merged weight."""

    def __init__(self):
        self.update_sq = self.error_sq = 0.0
        self.elements = self.lost = 0

    def add(self, base: torch.Tensor, update: torch.Tensor, saved: torch.Tensor) -> None:
        """base (fp32, as stored), update (fp32, B @ A * scaling), saved: what is written."""
        got = saved.float() - base
        self.update_sq += float(update.double().square().sum())
        self.error_sq += float((got - update).double().square().sum())
        moved = update != 0
        self.elements += int(moved.sum())
        self.lost += int((moved & (got == 0)).sum())

    def report(self, dtype: torch.dtype) -> dict:
        rel = (self.error_sq / self.update_sq) ** 0.5 if self.update_sq else 0.0
        return {"dtype": str(dtype).removeprefix("torch."), "merged_in": "float32",
                "update_relative_error": rel, "update_elements": self.elements,
                "update_elements_rounded_to_base": self.lost}


def _merge_tensors(tensors: dict, updates: dict, dtype: torch.dtype, kept: UpdateKept, done: set) -> dict:
    """Every tensor cast to `dtype`; the targeted weights merged in fp32 first."""
    out = {}
    for name, w in tensors.items():
        if name in updates:
            a, b, scaling = updates[name]
            base = w.float()
            update = (b @ a) * scaling  # (out, in) fp32
            merged = (base + update).to(dtype)
            kept.add(base, update, merged)
            done.add(name)
            out[name] = merged.contiguous()
        else:
            out[name] = w.to(dtype) if w.is_floating_point() else w
    return out


def _weight_files(folder: str) -> list[str]:
    """The files transformers loads the weights from: those the index names, or model.safetensors (never another
    copy beside them, such as Mistral's consolidated.safetensors)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"] if os.path.isfile(os.path.join(folder, "model.safetensors")) else []


def _base_files(source: str, revision: str | None) -> tuple[str, list[str]]:
    """(the local directory holding the base's weights, its weight files); a hub id: its snapshot."""
    if not os.path.isdir(source):
        from huggingface_hub import snapshot_download
        source = snapshot_download(source, revision=revision, allow_patterns=["model*.safetensors", "*.json"])
    files = _weight_files(source)
    if not files:
        raise MergeError(f"{source} holds no safetensors weights (model.safetensors or its index): `selfaug merge` "
                         "streams those; save the base with save_pretrained first, or evaluate the adapter unmerged")
    return source, files


def merge(adapter_dir: str, model_cfg, out: str, dtype: torch.dtype, tokenizer=None) -> dict:
    """The base of `model_cfg` with the adapter of `adapter_dir` merged in fp32, written to `out` in `dtype`
    (Hugging Face form; the tokenizer is the caller's, `tokenizer_dir` copies one), with `merge_report.json`.
    Written beside `out` and swapped in whole (`durable.replace_dir`). Returns the report."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    updates, _ = lora_updates(adapter_dir)
    kept, done = UpdateKept(), set()
    tmp = staging_dir(out)
    synthetic = model_cfg.init == "random" or model_cfg.name_or_path.startswith("builtin:tiny")
    folder, files = (None, []) if synthetic else _base_files(resolve_source(model_cfg.name_or_path)[0], model_cfg.revision)
    if synthetic:  # random-init or tiny: built in memory, merged the same way
        model = load_model(model_cfg, torch.float32)
        merged = _merge_tensors(model.state_dict(), updates, dtype, kept, done)
        model.to(dtype).load_state_dict(merged)
        model.save_pretrained(tmp)
    else:
        for name in files:
            with safe_open(os.path.join(folder, name), framework="pt") as f:  # one file of the base at a time
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {"format": "pt"}
            save_file(_merge_tensors(tensors, updates, dtype, kept, done), os.path.join(tmp, name), metadata=meta)
            del tensors
        for name in os.listdir(folder):
            if name.endswith(".json") and not name.startswith("adapter_"):
                shutil.copy(os.path.join(folder, name), os.path.join(tmp, name))
        config = config_of(model_cfg)
        config.dtype = dtype
        config.save_pretrained(tmp)
    missing = sorted(set(updates) - done)
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(f"{adapter_dir}: the base of {model_cfg.name_or_path} has no weight {missing[0]} (and "
                         f"{len(missing) - 1} more) that the adapter updates: is it the adapter's base model?")
    report = {**kept.report(dtype), "base": model_cfg.name_or_path, "adapter": os.path.abspath(adapter_dir),
              "weights_merged": len(done)}
    with open(os.path.join(tmp, MERGE_REPORT), "w") as f:
        json.dump(report, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)
    return report


def describe(report: dict, out: str) -> str:
    """The line a merge prints: where, in which dtype, and what the cast lost of the update."""
    lost = report["update_elements_rounded_to_base"] / max(report["update_elements"], 1)
    line = (f"merged {report['weights_merged']} weights in float32 into {out} ({report['dtype']}): the saved update "
            f"is within {100 * report['update_relative_error']:.2f} % of the exact one")
    if report["dtype"] != "float32":
        line += (f"; {100 * lost:.1f} % of its elements rounded back to the base weight ({report['dtype']}'s "
                 "resolution). `selfaug merge RUN --dtype float32` keeps it whole; `selfaug eval` runs the adapter "
                 "unmerged")
    return line
