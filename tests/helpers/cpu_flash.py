"""A CPU attention function with flash-attention's contract, registered with transformers'
`AttentionInterface` as "cpu_fa_contract" (importing this module registers it), for tests of the GPU path on
a CPU.

What transformers' flash-attention path does with its inputs (`_flash_attention_forward`, 5.x), and so
what this function does, with exact per-sequence causal attention (torch's sdpa on each segment):
- varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`): one flattened row, each segment attends to itself;
- no varlen kwargs, one row whose `position_ids` restart (not 0, 1, 2, ... throughout): the same, with the
  segments starting where position_ids is 0;
- otherwise plain causal attention over each whole row: any other mask is ignored (a name transformers
  has no mask function for gets none, and flash never reads a 4D mask).
A multi-row packed batch therefore lets each row's examples attend to each other here, as on a GPU.
`CALLS` counts which branch ran, so a test can show which one it exercised.
"""
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "cpu_fa_contract"  # no "flash" in it: transformers would try to import a flash kernel by that name
CALLS = Counter()


def _causal(q, k, v, scaling):
    """q (H, T, D), k/v (Hkv, T, D) -> (T, H, D): causal attention of one sequence."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(0, 1)


def _segments(q, k, v, bounds, scaling):
    """One row (H, T, D) cut at bounds [0, ..., T]: each segment alone."""
    out = [_causal(q[:, a:b], k[:, a:b], v[:, a:b], scaling) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(out, dim=0)


def cpu_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> ((B, T, H, D), None), as transformers' flash path."""
    B, T = query.shape[0], query.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is not None and cu_k is not None:
        assert B == 1, "flash's varlen path flattens the batch into one row"
        assert torch.equal(cu_q, cu_k) and kwargs.get("max_length_q") == int((cu_q[1:] - cu_q[:-1]).max())
        CALLS["varlen"] += 1
        return _segments(query[0], key[0], value[0], cu_q.tolist(), scaling)[None], None
    if position_ids is not None and B == 1:
        pos = position_ids.reshape(-1)
        if not torch.equal(pos, torch.arange(T, device=pos.device) + pos.min()):  # `_is_packed_sequence`
            CALLS["position_ids"] += 1
            starts = (pos == 0).nonzero().flatten().tolist()
            return _segments(query[0], key[0], value[0], starts + [T], scaling)[None], None
    CALLS["causal"] += 1
    return torch.stack([_causal(query[b], key[b], value[b], scaling) for b in range(B)]), None


AttentionInterface.register(NAME, cpu_flash_attention)
