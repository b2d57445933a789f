"""The stage-2 objective (docs/design.md, "Stage 2"): the module a DeepSpeed engine (or a Hugging Face
Trainer, `selfaug.hf`) runs on each micro-batch, the coefficients that normalize a step by its
global counts, and the schedules of alpha and the learning rate.

`Objective.forward(batch, c_nll, c_kl)` runs the decoder once, asks the teacher source for the
micro-batch's teacher, and returns (c_nll * NLL_sum + c_kl * KL_sum, NLL_sum, KL_sum), both sums
chunked from the hidden states through the head (`loss.py`).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from ..loss import selfaug_loss
from ..models import decoder_and_head, head_scale
from .batches import model_inputs
from .sources import TeacherSource


def alpha_at(step: int, tc, total: int) -> float:
    """alpha(step): constant, or linear / cosine from alpha_start to alpha over the run's `total` steps."""
    if tc.alpha_schedule == "constant":
        return tc.alpha
    frac = min(step / max(total - 1, 1), 1.0)
    if tc.alpha_schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return tc.alpha_start + (tc.alpha - tc.alpha_start) * frac


def warmup_steps(tc, total: int) -> int:
    """The warmup's optimizer steps: train.warmup_steps, or ceil(warmup_ratio x total) as transformers computes it."""
    return tc.warmup_steps if tc.warmup_steps else math.ceil(total * tc.warmup_ratio)


def lr_factor(step: int, tc, total: int) -> float:
    """The learning rate of optimizer step `step` (from 0) over learning_rate, as transformers' `get_scheduler`
    computes train.lr_scheduler_type over `total` steps: a linear warmup from 0, then constant, a linear decay to 0,
    or a cosine decay to 0 (cosine) or to min_lr_ratio (cosine_with_min_lr)."""
    warm, kind = warmup_steps(tc, total), tc.lr_scheduler_type
    if step < warm:
        return float(step) / float(max(1, warm))
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warm)))
    progress = float(step - warm) / float(max(1, total - warm))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = tc.min_lr_ratio if kind == "cosine_with_min_lr" else 0.0
    return max(0.0, factor * (1 - floor) + floor)


def _targets(modules: list[str]):
    """The target modules as peft expects them: "all-linear" as the string peft expands, else the list."""
    return "all-linear" if list(modules) == ["all-linear"] else list(modules)


def lora_config(tc):
    from peft import LoraConfig
    return LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout, bias="none",
                      target_modules=_targets(tc.lora_target_modules),
                      task_type="CAUSAL_LM")


class Coefficients(NamedTuple):
    c_nll: float  # world / (response tokens of the step)
    c_kl: float  # world * alpha / (KL positions of the step)
    n_nll: int
    n_kl: int
    alpha: float


def coefficients(world: int, alpha: float, n_nll: int, n_kl: int) -> Coefficients:
    """Each term's sum is divided once by its count over the whole step (all micro-batches, all ranks);
    x world because data-parallel gradients are averaged over ranks."""
    return Coefficients(world / max(n_nll, 1), world * alpha / max(n_kl, 1), n_nll, n_kl, alpha)


class Objective(torch.nn.Module):
    """The module the engine wraps: forward(batch) -> (loss, nll_sum, kl_sum) for one micro-batch."""

    def __init__(self, model, tc, source: TeacherSource):
        super().__init__()
        self.model = model
        self.tc = tc
        self.__dict__["source"] = source  # not a submodule: a live teacher's frozen copy is never trained

    def setup_zero3_head(self) -> None:
        """Under ZeRO-3 the chunked loss applies the lm_head outside its module's hooks. A head that trains is
        registered as an external parameter of this module: gathered while forward (and backward) runs and
        released after, its gradient reduce-scattered like every other parameter's. A frozen head (LoRA) is
        gathered for the forward alone (`_frozen_head`): the loss saves no weight for backward, and DeepSpeed
        would otherwise gather it again when backward starts and hold it through backward (2.1 GB at 70B). No
        rank keeps a whole copy of it."""
        import deepspeed
        _, head = decoder_and_head(self.model)
        params = [p for p in (head.weight, head.bias) if p is not None]
        if any(p.requires_grad for p in params):
            for p in params:
                deepspeed.zero.register_external_parameter(self, p)
        else:
            self.__dict__["frozen_head"] = params

    def _frozen_head(self):
        """The frozen ZeRO-3 head gathered while the forward runs (a no-op otherwise)."""
        return gathered_head(self.__dict__.get("frozen_head"))

    def head(self):
        """(weight, bias) of the lm_head as the loss uses them (gathered while forward runs, under ZeRO-3)."""
        _, head = decoder_and_head(self.model)
        return head.weight, head.bias

    @torch.no_grad()
    def original_hidden(self, batch: dict):
        """(final hidden states (B, T, H), head weight, bias) of the original model: this LoRA student with
        its adapters disabled. The one call a teacher source makes into the objective (online, LoRA)."""
        body, _ = decoder_and_head(self.model)
        weight, bias = self.head()
        with self.model.disable_adapter():
            return body(**model_inputs(batch)).last_hidden_state * head_scale(self.model), weight, bias

    def forward(self, batch: dict, c_nll: float, c_kl: float, with_kl: bool = True):
        """with_kl=False: the NLL alone (KL sum 0); with c_kl = 0 the KL is measured without gradient work."""
        body, _ = decoder_and_head(self.model)
        hidden = body(**model_inputs(batch)).last_hidden_state  # (B, T, H), padded or packed rows
        scale = head_scale(self.model)  # logits = scale * lm_head(hidden): Granite, Falcon-H1, Cohere
        if scale != 1.0:
            hidden = hidden * scale
        with self._frozen_head():  # under ZeRO-3 with a frozen head: gathered for the teacher and the loss only
            teacher = self.source.signal(batch, self) if with_kl else None
            return micro_batch_loss(hidden, self.head(), batch, teacher, self.tc, c_nll, c_kl)


def for_engine_backward(loss: torch.Tensor) -> torch.Tensor:
    """The micro-batch's loss as DeepSpeed's `engine.backward(loss, scale_wrt_gas=False)` must get it: a new tensor.

    The loss is already divided by the whole step's counts, so DeepSpeed must not divide by the accumulation
    steps. It divides in two places: backward's `scale_wrt_gas`, and a hook that `engine.forward` puts on its
    outputs, which skips its division only when backward's own loss tensor (hooked later) was reached first.
    ZeRO-2/3's loss scaling returns a new tensor, so it is; ZeRO-0 and ZeRO-1 in bf16 pass the forward's output
    through unchanged, so the output's hook fired first and divided: a gradient 1/accum of the right one
    (tests/train/test_accumulation.py). A clone is one scalar node in front of the output on every stage."""
    return loss.clone()


def gathered_head(params: list | None):
    """A frozen ZeRO-3 head's parameters gathered for the teacher and the loss alone (the loss saves no weight, so
    backward needs none of it); a no-op without them (no ZeRO-3, or a head that trains: DeepSpeed gathers that one
    as an external parameter)."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


def micro_batch_loss(hidden: torch.Tensor, head: tuple, batch: dict, teacher, tc, c_nll: float, c_kl: float):
    """(c_nll * NLL_sum + c_kl * KL_sum, NLL_sum, KL_sum) of one micro-batch, through one chunked pass of the
    head (`loss.selfaug_loss`: never a whole logits tensor).

    Args:
        hidden: (B, T, H) the decoder's final hidden states of the collated rows.
        head: (weight (V, H), bias (V,) or None) of the lm_head.
        batch: the collated micro-batch on its device (`batches.to_device`): labels (B, T), rows_b and rows_t (N,).
        teacher: the loss's teacher object for the N KL rows, or None (plain fine-tuning: KL sum 0).
        tc: the train options read here: kl_direction, kl_tail, loss_chunk_rows.
    """
    weight, bias = head
    return selfaug_loss(hidden, weight, bias, batch["labels"], batch["rows_b"], batch["rows_t"], teacher, c_nll, c_kl,
                        reverse=tc.kl_direction == "reverse", tail=tc.kl_tail, chunk_rows=tc.loss_chunk_rows,
                        nll_rows=batch.get("nll_rows"))
