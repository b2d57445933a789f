"""`selfaug bench --only loss` (docs/design.md, "Benchmarks"): what the head's loss keeps from forward to backward
at the Llama-3-8B head (V = 128256, H = 4096, bf16), counted, not estimated: the saved-for-backward bytes
(`torch.autograd.graph.saved_tensors_hooks`, each storage once) and the largest tensor among them, with the head
frozen (LoRA) and trained (full fine-tuning), for NLL and KL through the one pass (`loss.selfaug_loss`); and that
no gradient work is done under no_grad (nothing saved, the pass asked for no gradient). The arithmetic for the
real shape is printed beside the count.
"""
from __future__ import annotations

import time

import torch

V, H = 128256, 4096  # Llama-3-8B's vocabulary and width


def _saved(fn):
    """(bytes, largest tensor's shape) autograd keeps while fn runs: each storage once."""
    seen, shapes = {}, []

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()), max(shapes, key=lambda s: torch.Size(s).numel()) if shapes else None


def bench_head_buffers(smoke: bool = False) -> dict:
    from .. import loss
    vocab, hidden, rows = (4096, 256, 64) if smoke else (V, H, 256)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16)
    hid = torch.randn(1, rows, hidden, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    rows_t = torch.arange(rows // 2)
    k = 64
    ids = torch.randint(0, vocab, (rows // 2, k), generator=g)
    teacher = loss.StoredTeacher(ids, torch.full((rows // 2, k), -5.0), torch.full((rows // 2,), -0.5))
    out = {"vocab": vocab, "hidden": hidden, "rows": rows, "dtype": "bfloat16"}
    for name, w in (("frozen_head", weight), ("trained_head", weight.clone().requires_grad_())):
        t0 = time.perf_counter()
        (value, _, _), nbytes, largest = _saved(lambda: loss.selfaug_loss(hid, w, None, labels, rows_t * 0, rows_t,
                                                                          teacher, 1.0 / rows, 0.5 / len(rows_t)))
        value.backward()
        out[name] = {"saved_bytes": nbytes, "largest_saved": list(largest), "seconds": time.perf_counter() - t0,
                     "formula_bytes": rows * hidden * 2 + (vocab * hidden * 2 if w.requires_grad else 0)}
    with torch.no_grad():
        (_, _, _), nbytes, _ = _saved(lambda: loss.selfaug_loss(hid, weight, None, labels, rows_t * 0, rows_t, teacher,
                                                                1.0, 1.0))
    out["no_grad_saved_bytes"] = nbytes
    out["real_shape"] = {"head_bf16_gib": V * H * 2 / 2 ** 30, "head_fp32_gib": V * H * 4 / 2 ** 30,
                         "hidden_grad_16k_tokens_mib": 16384 * H * 2 / 2 ** 20}
    return out
