"""The lm_head as selfaug's stages apply it (docs/design.md, "The head contract"): the body and head of a causal LM,
the head's vocabulary, and the one probe forward that checks the model's logits are c * lm_head(final hidden state),
with c read from the config for the families that scale after their head (Granite, Falcon-H1, Cohere).
"""
from __future__ import annotations

import torch

from .errors import ModelError


def vocab_size(model) -> int:
    """Rows of the lm_head, also when ZeRO-3 has partitioned it (its local shape is then empty)."""
    w = model.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model):
    """(the transformer body that returns last_hidden_state, the lm_head module) of a causal LM,
    looking through a peft wrapper. The loss and stage 1 apply the head themselves, only where needed, to the
    hidden states times `head_scale(model)`."""
    hf = _causal_lm(model)
    if getattr(hf.config, "final_logit_softcapping", None) not in (None, 0, 1.0):  # not linear: no scale can carry it
        raise ModelError(f"{type(hf).__name__} caps its logits (config.final_logit_softcapping="
                         f"{hf.config.final_logit_softcapping}): its logits are not a linear function of "
                         "lm_head(hidden), which selfaug's loss and store apply; this model is not supported")
    return hf.base_model, hf.get_output_embeddings()


# the linear transforms of lm_head(h) that transformers' causal LMs apply after the head, by config attribute:
# Granite (and its MoE variants) divide by logits_scaling, Falcon-H1 multiplies by lm_head_multiplier, Cohere by
# logit_scale. Applied to the hidden states (c * h @ W^T = c * logits), which is why a head with a bias is refused.
LINEAR_HEADS = {"logits_scaling": lambda v: 1.0 / v, "lm_head_multiplier": float, "logit_scale": float}


def head_scale(model) -> float:
    """c such that the model's logits are c * lm_head(final hidden state): what `check_head` measured, else what
    the config says (`LINEAR_HEADS`; 1.0 for most models)."""
    hf = _causal_lm(model)
    measured = getattr(hf, "_selfaug_head_scale", None)
    if measured is not None:
        return measured
    scale = 1.0
    for attr, factor in LINEAR_HEADS.items():
        value = getattr(hf.config, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            scale *= factor(value)
    return scale


@torch.no_grad()
def check_head(model) -> float:
    """The head contract, asked of the model itself: one probe forward (8 tokens) compares the model's own logits
    with head_scale * lm_head(final hidden state), which is what selfaug's loss, store and drift compute. A model
    whose logits are something else (a transform not in LINEAR_HEADS, a cap, a custom forward) is refused in one
    line naming its type. Under ZeRO-3 call it on the engine's module (the forward gathers as in training)."""
    hf = _causal_lm(model)
    body, head = decoder_and_head(model)
    scale = head_scale(model)
    if scale != 1.0 and head.bias is not None:
        raise ModelError(f"{type(hf).__name__} scales its logits by {scale:g} and its lm_head has a bias: selfaug "
                         "applies such a scale to the hidden states, which would scale the bias too; not supported")
    seen = {}

    def keep(module, args, out):  # returns None: the output goes on unchanged
        seen["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state
    hook = body.register_forward_hook(keep)
    ids = (torch.arange(8, device=hf.get_input_embeddings().weight.device) * 7 + 3)[None] % vocab_size(model)
    try:
        logits = hf(input_ids=ids, use_cache=False).logits.float()  # (1, 8, V)
    finally:
        hook.remove()
    mine = head(seen["h"].to(head.weight.device)).float()
    err = float(((mine * scale - logits).abs().max() / logits.abs().max().clamp_min(1e-6)))
    tol = 1e-3 if head.weight.dtype == torch.float32 else 3e-2  # bf16: the two paths' rounding
    if not err <= tol:
        fit = float((logits * mine).sum() / (mine * mine).sum().clamp_min(1e-30))
        raise ModelError(f"{type(hf).__name__}: its logits are not {scale:g} * lm_head(final hidden state) as "
                         f"selfaug computes them (they differ by {err:.2g} of the largest logit; the closest scale is "
                         f"{fit:.4g}): a transform after its head that selfaug does not know, so the store, the KL and "
                         "the NLL would use a distribution the model never produces; this model is not supported")
    hf._selfaug_head_scale = scale
    return scale
