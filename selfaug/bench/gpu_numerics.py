"""The numerical checks of `launch.sh gpu-check` (docs/design.md, "Benchmarks"), each a figure against a stated
bound that the bug it looks for breaks:

  attention      the embedded SmolLM2 (pretrained: on random weights the loss stays near log V whatever the
                 attention does) on real RAG examples, packed into one varlen row (cu_seq_lens) against padded:
                 the decoder's final hidden states and the lm_head's weight gradient. The multi-row layout (a row's
                 documents attending to each other, what flash does with packed rows without varlen arguments) is
                 measured the same way and must exceed the bound: the check's power to fail, shown each run.
  accumulation   ZeRO-3 bf16, `selfaug train` in this process: 2 SGD steps of 2 micro-batches of 2 against 1 of 4;
                 the adapter's relative difference (a gradient divided twice is 0.5 away)
  bf16           3 steps in bf16 against fp32 from the same store: finite, the losses close

Each returns {"bounds": {name: {"figure", "bound", "rule", "passed"}}, ...what else it measured}.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F

CONTRACT = "cuda_fa_contract"  # no "flash" in the name: transformers would look for a kernel by it
# bounds: fp32 (the CPU's emulation) is exact up to summation order; bf16 rounds every matmul of 30 layers
ATTENTION_BOUND = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
ACCUMULATION_BOUND = 5e-2  # bf16 weights: the forward's rounding; the double division is 0.5 (a factor of 2)
BF16_LOSS_BOUND = 5e-2


def bound(figure: float, limit: float, rule: str = "<=") -> dict:
    """One figure against its bound: rule "<=" (at most), ">" (must exceed: a check's power to fail), "==" ."""
    passed = {"<=": figure <= limit, ">": figure > limit, "==": figure == limit}[rule]
    return {"figure": figure, "bound": limit, "rule": rule, "passed": bool(passed)}


def _contract_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attention's contract with torch's sdpa (tests/helpers/cpu_flash.py is its CPU twin): varlen kwargs or
    one row of restarting position_ids -> each segment alone; otherwise plain causal attention over each row."""
    cu, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    B, T = query.shape[0], query.shape[2]

    def causal(q, k, v):
        k, v = (x.repeat_interleave(q.shape[0] // x.shape[0], 0) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1)

    def segments(bounds):
        return torch.cat([causal(query[0][:, a:b], key[0][:, a:b], value[0][:, a:b])
                          for a, b in zip(bounds[:-1], bounds[1:]) if b > a])[None]
    if cu is not None:
        return segments(cu.tolist()), None
    if pos is not None and B == 1:
        p = pos.reshape(-1)
        if not torch.equal(p, torch.arange(T, device=p.device) + p.min()):
            return segments((p == 0).nonzero().flatten().tolist() + [T]), None
    return torch.stack([causal(query[b], key[b], value[b]) for b in range(B)]), None


def attention_kernel() -> str:
    """flash_attention_2 on a GPU with the flash-attn package; otherwise the contract function, registered."""
    from transformers.utils import is_flash_attn_2_available
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    from transformers import AttentionInterface
    AttentionInterface.register(CONTRACT, _contract_attention)
    return CONTRACT


def check_attention(cfg_path: str, overrides: list[str], examples: int = 6, dtype: torch.dtype | None = None) -> dict:
    """Packed (one varlen row) = padded on the pretrained SmolLM2; the multi-row layout is not (see the docstring).
    dtype: bf16 on a GPU (flash-attention runs in 16 bits only), fp32 on a CPU, unless given."""
    from ..config import load_config
    from ..data import load_examples
    from ..head import decoder_and_head
    from ..loss import selfaug_loss
    from ..models import SMOLLM2, load_model, load_tokenizer_for
    from ..train.batches import PADDED, MaskedPacking, VarlenPacking, collate, model_inputs, to_device
    kernel = attention_kernel()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = load_config(cfg_path, list(overrides) + [f"model.name_or_path={SMOLLM2}", "model.init=pretrained",
                                                   "data.train=builtin:rag", "data.max_seq_len=512"])
    data = load_examples(cfg.data.train, load_tokenizer_for(cfg.model), cfg.data)
    rows = [{"input_ids": e.input_ids, "prompt_len": e.prompt_len, "positions": []}
            for e in data.examples(0, examples)[0]]
    lens = [len(r["input_ids"]) for r in rows]
    model = load_model(dataclasses.replace(cfg.model, attn_implementation=kernel), dtype, device=device)
    model.requires_grad_(True)  # full fine-tuning: the head's (tied) weight gets its gradient
    body, head = decoder_and_head(model)
    # multi-row: two examples to a row, each row one causal sequence under flash (no varlen arguments)
    layouts = {"padded": PADDED, "varlen": VarlenPacking(), "multi_row": MaskedPacking(2 * max(lens), 1e9)}
    got = {}
    for name, layout in layouts.items():
        batch = to_device(collate(rows, 0, layout), device)
        hidden = body(**model_inputs(batch)).last_hidden_state  # (rows, width, H)
        where_row, where_off = layout.place(lens)
        per_example = torch.cat([hidden[b, o:o + n] for b, o, n in zip(where_row, where_off, lens)])  # (sum lens, H)
        n_nll = int((batch["labels"] != -100).sum())
        loss, _, _ = selfaug_loss(hidden, head.weight, head.bias, batch["labels"], None, None, None, 1.0 / n_nll, 0.0,
                                  nll_rows=batch["nll_rows"])
        grad, = torch.autograd.grad(loss, [head.weight])
        got[name] = (per_example.detach().float(), grad.float(), loss.item())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    limit = ATTENTION_BOUND[dtype]
    figures = {name: {"hidden_rel_diff": rel(got[name][0], got["padded"][0]),
                      "head_grad_rel_diff": rel(got[name][1], got["padded"][1]),
                      "loss_rel_diff": abs(got[name][2] - got["padded"][2]) / abs(got["padded"][2])}
               for name in ("varlen", "multi_row")}
    out = {"attention_kernel": "emulated" if kernel == CONTRACT else kernel, "model": SMOLLM2, "dtype": str(dtype),
           "examples": len(rows), "tokens": sum(lens), **figures,
           "bounds": {"varlen_hidden": bound(figures["varlen"]["hidden_rel_diff"], limit),
                      "varlen_head_grad": bound(figures["varlen"]["head_grad_rel_diff"], limit),
                      # the check's power to fail: documents attending to each other exceed the same bound
                      "multi_row_hidden_exceeds": bound(figures["multi_row"]["hidden_rel_diff"], limit, ">"),
                      "multi_row_head_grad_exceeds": bound(figures["multi_row"]["head_grad_rel_diff"], limit, ">")}}
    if kernel == CONTRACT:
        out["note"] = ("emulated: the flash-attn package is not installed (or no GPU), a function with flash-attention's "
                       "contract ran instead; transformers' real flash_attention_2 path was not tested")
    del model, body, head
    return out


SGD = ["train.optim=sgd", "train.learning_rate=1.0", "train.min_lr_ratio=1.0", "train.warmup_steps=0",
       "train.max_grad_norm=1e9", "train.max_steps=2", "train.adapter=lora", "train.resume=never"]


def check_accumulation(cfg_path: str, overrides: list[str], tmp: str, dtype: str = "bfloat16") -> dict:
    """ZeRO-3 in `dtype` (bf16 on the GPU): 2 SGD steps with accumulation 2 (micro-batch 2) against accumulation 1
    (micro-batch 4), the adapter's lora_B (lora_A moves only through B, which starts at 0) compared."""
    from safetensors.torch import load_file
    from .. import shipped
    from ..config import load_config
    from ..train import train
    adapters = {}
    for name, micro, accum in (("accum1", 4, 1), ("accum2", 2, 2)):
        cfg = load_config(cfg_path, list(overrides) + SGD + [
            f"model.dtype={dtype}", f"train.deepspeed={shipped.resolve('ds_configs/zero3.json')}",
            f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={accum}",
            f"train.output_dir={tmp}/accumulation-{name}"])
        run = train(cfg)
        adapters[name] = load_file(os.path.join(run, "final", "adapter_model.safetensors"))
    keys = [k for k in adapters["accum1"] if "lora_B" in k]
    ref = torch.cat([adapters["accum1"][k].float().flatten() for k in keys])
    new = torch.cat([adapters["accum2"][k].float().flatten() for k in keys])
    err = ((new - ref).norm() / ref.norm()).item()
    return {"zero_stage": 3, "dtype": dtype, "steps": 2, "update_norm_ratio": (new.norm() / ref.norm()).item(),
            "bounds": {"adapter_rel_diff": bound(err, ACCUMULATION_BOUND),
                       "adapter_moved": bound(ref.norm().item(), 0.0, ">")}}


def check_bf16(cfg_path: str, overrides: list[str], tmp: str, steps: int = 3) -> dict:
    """`steps` steps of selfaug train in bf16 and in fp32 from the same store: finite, the losses close."""
    from ..config import load_config
    from ..train import train
    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(cfg_path, list(overrides) + [f"model.dtype={dtype}", f"train.max_steps={steps}",
                                                       f"train.output_dir={tmp}/bf16-{dtype}", "train.resume=never"])
        with open(os.path.join(train(cfg), "metrics.jsonl")) as f:
            rows[dtype] = [json.loads(line) for line in f]
    diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(rows["float32"], rows["bfloat16"])]
    finite = all(torch.isfinite(torch.tensor(r["loss"])).item() for r in rows["bfloat16"])
    return {"losses": {k: [r["loss"] for r in v] for k, v in rows.items()},
            "bounds": {"loss_rel_diff_max": bound(max(diffs), BF16_LOSS_BOUND),
                       "bf16_finite": bound(int(finite), 1, "==")}}
