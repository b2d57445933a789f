"""SelfAug inside a Hugging Face trainer (docs/design.md, "In your own trainer"): `SelfAugMixin` for any
`transformers.Trainer` subclass (TRL's `SFTTrainer` included), and `SelfAugTrainer`, the mixin on
`Trainer` itself.

The mixin is glue only; what it runs is selfaug's own: the store (`TeacherStore`, verified), the
collation and the teacher rows (`StoredSignal.batch`), the chunked loss (`objective.micro_batch_loss`),
the step's normalization (`objective.coefficients`, from the whole step's counts over all ranks, computed
once per optimizer step in `get_batch_samples`) and alpha (`train.alpha`: the schedule, or the drift
controller of `drift_budget`, its state in the trainer's checkpoints under
`TrainerState.stateful_callbacks["selfaug_alpha"]`). It never
relies on the parent's rule for scaling: `compute_loss` returns world x (NLL_sum / N_nll + alpha x
KL_sum / N_kl) for the micro-batch, already scaled for accumulation (`loss_is_scaled_for_ga`).

The loss is computed inside the model's own forward: a hook keeps the decoder's final hidden states
and a hook on the top module, run before DeepSpeed's own, applies the chunked head there and returns
the loss as the output's `loss`. So under ZeRO-3 the head, registered as an external parameter of the
top module, is gathered for the loss and again in backward (as `selfaug train` does with its
objective), and the model's own head runs on one position only (`logits_to_keep=1`). Under FSDP2 the loss
reads the head after fully_shard's own pre-hook (prepended) unsharded it; FSDP1 is refused.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer

from .. import dist, store
from ..config import build_section
from ..data import DataError, tokenizer_fingerprint
from ..models import (TRANSFORMERS, attention_width, check_head, decoder_and_head, head_scale, transformers_outside_range,
                      vocab_size)
from ..train import TrainError
from ..train.batches import layout_for, model_inputs, to_device
from ..train.alpha import alpha_control
from ..train.objective import coefficients, for_engine_backward, micro_batch_loss
from ..train.sources import StoredSignal
from .dataset import LENGTH, SelfAugCollator, StepOrder, match_dataset, store_dataset

# the options of the recipe's train section that the mixin takes as keywords, with their defaults there
OPTIONS = ("alpha", "alpha_schedule", "alpha_start", "drift_budget", "drift_horizon", "alpha_min", "alpha_max",
           "kl_direction", "kl_tail", "loss_chunk_rows", "packing", "pack_tokens", "verify_store")
ALPHA_STATE = "selfaug_alpha"  # the drift controller's state in TrainerState.stateful_callbacks (checkpointed)


def check_store_for(teacher_store, model, tokenizer) -> None:
    """Refuse a store made with another vocabulary or tokenizer (the settings of `selfaug train`'s check),
    naming each differing field. The weights are checked at the first step (`StoredSignal.check_start`)."""
    settings = teacher_store.manifest["settings"]
    found = {"model": {"vocab_size": vocab_size(model)}}
    keys = ["model.vocab_size"]
    if tokenizer is not None:
        found["tokenizer"] = tokenizer_fingerprint(tokenizer)
        keys += ["tokenizer.vocab_sha256", "tokenizer.chat_template_sha256"]
    diff = store.settings_diff(found, settings, keys)
    if diff:
        raise store.StoreError(f"teacher store {teacher_store.dir} was not made for this model and tokenizer: "
                               + "; ".join(d.replace("recipe:", "given:") for d in diff)
                               + f". It was computed with {settings['model'].get('name_or_path')}: train that model "
                                 "(with its tokenizer), or precompute a store with this one")


def _optimizer_steps(args, examples: int, world: int) -> int:
    """The run's optimizer steps: args.max_steps, or the epochs' (what drift_horizon auto divides)."""
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(math.ceil(examples / (args.per_device_train_batch_size * world)) // args.gradient_accumulation_steps, 1)
    return max(int(math.ceil(args.num_train_epochs * per_epoch)), 1)


def check_transformers(version: str | None = None) -> None:
    """One line when the installed transformers is outside the range the mixin is tested with: it overrides
    private Trainer methods (`_remove_unused_columns`, `_get_collator_with_removed_columns`,
    `_get_train_sampler`, `get_batch_samples`'s return) and sets `loss_is_scaled_for_ga`, so another release
    could misalign the teacher rows or divide the loss twice by the accumulation steps."""
    import transformers
    found = transformers_outside_range(version or transformers.__version__)  # the module this process imported
    if found:
        raise TrainError(f"selfaug.hf supports transformers {','.join(TRANSFORMERS)} (it overrides private Trainer "
                         f"methods checked against those releases); found {found}: pip install "
                         f"'transformers{','.join(TRANSFORMERS)}'")


def probe_head(model) -> bool:
    """Whether `check_head` can run on the model as the Trainer gets it: whole (no ZeRO-3 partition), no meta
    tensor, and on the CPU only when small (an unsharded 70B waiting for FSDP would run a CPU forward per rank)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") or p.is_meta for p in params):
        return False
    return params[0].device.type != "cpu" or sum(p.numel() for p in params) < 2e9


def refuse_fp16(args, model) -> None:
    """fp16 in any form, one line: the chunked head computes its gradients in the forward, before a loss scale
    applies, so fp16 would flush the KL's small gradients (~1e-6 and below) to zero. bf16 and fp32 are fine."""
    ds = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    head = decoder_and_head(model)[1].weight
    why = ("args.fp16=True" if getattr(args, "fp16", False) else
           "args.fp16_full_eval=True" if getattr(args, "fp16_full_eval", False) else
           "the DeepSpeed config enables fp16" if ds.get("fp16", {}).get("enabled") is True else
           "the model's weights are float16" if head.dtype == torch.float16 else None)
    if why:
        raise TrainError(f"{why}: SelfAug's loss computes the head's gradients before any loss scale, so float16 "
                         "would flush the KL's small gradients to zero; train in bf16 (args.bf16=True, a bfloat16 or "
                         "float32 model) or float32")


def refuse_fsdp1(args) -> None:
    """FSDP version 1, one line: only FSDP2 is tested (the head unsharded where the loss reads it, the result equal
    to one process's: tests/hf/test_hf_fsdp.py); FSDP1's flat parameters are deprecated by transformers."""
    version = (getattr(args, "fsdp_plugin_args", None) or {}).get("fsdp_version")
    if version is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # `accelerate launch`'s config
        version = int(os.environ.get("FSDP_VERSION", "1"))
    if version == 1:
        raise TrainError("SelfAugTrainer supports FSDP2 only, and FSDP version 1 is set: pass "
                         "fsdp_config={\"version\": 2} (or fsdp_version: 2 in the accelerate config)")


class _StepGuard:
    """A TrainerCallback: after each optimizer step, the step's sums must be finite (a skipped or NaN step
    is an error, never a silent substitution)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._selfaug_check_step(state.global_step)


class SelfAugMixin:
    """SelfAug for a `transformers.Trainer` subclass: `class T(SelfAugMixin, SFTTrainer)`.

    Keywords (the rest go to the trainer): `teacher_store` (a `selfaug precompute` store, required),
    `alpha`, `alpha_schedule`, `alpha_start`, `drift_budget`, `drift_horizon`, `alpha_min`, `alpha_max`,
    `kl_direction`, `kl_tail`, `loss_chunk_rows`, `packing`,
    `pack_tokens`, `verify_store` (as in a recipe's `train` section), `check_teacher` (the KL at step 0
    must be ~0: the model is the store's teacher). `train_dataset` is optional: without it the store's
    own examples are trained on; with it, it must be the tokenized data the store was made from.
    """

    loss_is_scaled_for_ga = True  # compute_loss returns the loss normalized by the whole step's counts

    def __init__(self, model=None, args=None, *, teacher_store: str, train_dataset=None, data_collator=None,
                 check_teacher: bool = True, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        if args is None:
            raise TypeError("SelfAugMixin needs args (TrainingArguments): the batch size, steps and optimizer")
        # the options checked as a recipe's train section is (choices, ranges)
        tc = build_section("train", {**options, "max_steps": max(args.max_steps, 1)})
        if not store.is_url(teacher_store) and not os.path.isdir(teacher_store):
            raise store.StoreError(f"teacher_store {teacher_store!r} does not exist: run `selfaug precompute` first")
        if data_collator is not None and not isinstance(data_collator, SelfAugCollator):
            raise DataError("data_collator must be a selfaug.hf.SelfAugCollator (it carries the teacher rows to the "
                            "loss); leave it out for the default, with packing=True to pack")
        check_transformers()
        if getattr(args, "n_gpu", 1) > 1:  # one process, several GPUs: the Trainer would wrap it in DataParallel
            raise TrainError(f"one process sees {args.n_gpu} GPUs, so the Trainer would run torch.nn.DataParallel, which "
                             "splits each micro-batch without its teacher rows: start one process per GPU (torchrun "
                             f"--nproc_per_node {args.n_gpu} script.py, accelerate launch, or deepspeed), or make one "
                             "GPU visible (CUDA_VISIBLE_DEVICES=0)")
        refuse_fp16(args, model)
        refuse_fsdp1(args)
        # the head contract: a probe forward where the model is whole and on one device; the config's scale where it is
        # ZeRO-3 partitioned, on meta (cpu_ram_efficient_loading's ranks above 0) or large on the CPU (before FSDP)
        scale = check_head(model) if probe_head(model) else head_scale(model)
        world = args.world_size  # sets up the process group (accelerate) before the store is opened by every rank
        teacher = store.TeacherStore(store.local_store(teacher_store), verify=tc.verify_store)  # a URL: the mirror
        tokenizer = kwargs.get("processing_class")
        check_store_for(teacher, model, tokenizer)
        dataset = store_dataset(teacher) if train_dataset is None else match_dataset(train_dataset, teacher)
        longest = int(max(dataset[LENGTH]))
        pack_tokens = (tc.pack_tokens or longest) if tc.packing else None
        if pack_tokens is not None and pack_tokens < longest:
            raise TrainError(f"pack_tokens={pack_tokens} is smaller than the longest example ({longest} tokens)")
        layout = layout_for(model.config._attn_implementation, tc.packing, pack_tokens, attention_width(model.config))
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(model.config, "pad_token_id", None) or 0
        if hasattr(args, "dataset_kwargs"):  # TRL: the dataset is already the store's tokens
            args = copy.copy(args)
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self._selfaug = {"tc": tc, "store": teacher, "world": world, "co": None, "check": check_teacher,
                         "alpha": alpha_control(tc, _optimizer_steps(args, len(dataset), world)),
                         "step_sums": None, "log_sums": None, "log_steps": 0, "zero3_head": False,
                         "head_scale": scale}
        super().__init__(model=model, args=args, train_dataset=dataset,
                         data_collator=data_collator or SelfAugCollator(teacher, pad_id, layout), **kwargs)
        self.add_callback(_StepGuard(self))

    # ---- the data: every setting keeps the teacher rows with their example -------------------------

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the collator reads the store's rows; the dataset holds only their numbers

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _get_train_sampler(self, train_dataset=None):
        """`random` (the default): the seeded order of `selfaug train` (the same examples in every step and
        micro-batch on every rank); other strategies (sequential, group_by_length) are the trainer's own."""
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "random":
            return super()._get_train_sampler(train_dataset)
        a = self.args
        n, g = len(train_dataset), a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        steps = a.max_steps if a.max_steps > 0 else math.ceil(n / g)  # a "trainer epoch" of the stream
        seed = a.data_seed if a.data_seed is not None else a.seed
        return StepOrder(n, a.per_device_train_batch_size, a.gradient_accumulation_steps, a.world_size, seed, steps)

    # ---- one optimizer step: the counts first, then the micro-batches ------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """This rank's micro-batches of the step, and the step's coefficients from the counts of all of
        them on all ranks (one all-reduce per optimizer step)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        # the collator's nll_rows: counted from the shape, no device sync (labels counted where a batch lacks them)
        counts = [sum(b["nll_rows"].numel() if "nll_rows" in b else int(b["labels"].ne(-100).sum()) for b in batches),
                  sum(int(b["rows_b"].numel()) for b in batches)]
        n_nll, n_kl = (int(c) for c in dist.all_reduce_sum(counts))
        s = self._selfaug
        s["co"] = coefficients(s["world"], self._selfaug_alpha(), n_nll, n_kl)
        return batches, torch.tensor(n_nll, device=device)

    def _selfaug_alpha(self) -> float:
        """alpha of the step about to run; after a resume, the drift controller's state from the checkpoint's
        trainer state."""
        s, step = self._selfaug, self.state.global_step
        control = s["alpha"]
        if s["tc"].drift_budget is not None and control.steps != step:
            saved = (self.state.stateful_callbacks or {}).get(ALPHA_STATE)
            if saved is None or saved.get("steps") != step:
                raise TrainError(f"resuming at step {step} with drift_budget, but the checkpoint holds no drift "
                                 "controller state for that step (it was written without drift_budget)")
            control.load_state_dict(saved)
        return control.at(step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self._selfaug
        co = s["co"]
        if co is None or not model.training:  # evaluation: this batch alone
            n_nll, n_kl = int(inputs["labels"].ne(-100).sum()), int(inputs["rows_b"].numel())
            co = coefficients(1, s["co"].alpha if s["co"] is not None else s["tc"].alpha, n_nll, n_kl)
        loss, nll, kl, output = self._selfaug_forward(model, inputs, co)
        if model.training:
            if s["check"] and self.state.global_step == 0:
                self._selfaug_check_teacher(kl, int(inputs["rows_b"].numel()))
            part = torch.stack([nll.double() / max(co.n_nll, 1), kl.double() / max(co.n_kl, 1)])
            s["step_sums"] = part if s["step_sums"] is None else s["step_sums"] + part
            loss = for_engine_backward(loss)  # the Trainer passes it to engine.backward(scale_wrt_gas=False)
        return (loss, output) if return_outputs else loss

    def _selfaug_forward(self, model, batch, co):
        """(loss, NLL sum, KL sum, output): the model's forward with the chunked loss computed inside it."""
        s = self._selfaug
        top = self.accelerator.unwrap_model(model)
        body, head = decoder_and_head(top)
        zero3 = hasattr(head.weight, "ds_id")
        params = [p for p in (head.weight, head.bias) if p is not None]
        trains = any(p.requires_grad for p in params)
        if zero3 and trains and not s["zero3_head"]:  # ZeRO-3, a head that trains: gathered for the loss and backward
            import deepspeed
            for p in params:
                deepspeed.zero.register_external_parameter(top, p)
            s["zero3_head"] = True
        # the trainer moved the tensors; ids widened, the teacher rows moved (from pinned memory: the Trainer's
        # DataLoader pins them through their pin_memory, so the copy does not stall the host)
        batch = to_device(batch, batch["input_ids"].device, non_blocking=True)
        teacher = batch["teacher"]
        seen = {}

        def keep_hidden(module, args, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            seen["hidden"] = hidden * s["head_scale"] if s["head_scale"] != 1.0 else hidden

        def loss_at_head(module, args):
            # the head's parameters are in place here: a frozen ZeRO-3 head gathered by its own pre-hook, inside the
            # forward DeepSpeed traces, once (gathering it again after the forward was a second all-gather); under
            # FSDP2, unsharded by the pre-hook fully_shard prepends (docs/trainer.md, "Sharded: DeepSpeed and FSDP2")
            if isinstance(head.weight, DTensor):
                raise TrainError(f"the head's weight is a sharded DTensor ({head.weight.placements}) where the loss reads "
                                 "it: SelfAug needs the whole head there (FSDP2's fully_shard unshards it; tensor "
                                 "parallelism of the head is not supported)")
            seen["loss"], *seen["sums"] = micro_batch_loss(seen.pop("hidden"), (head.weight, head.bias), batch,
                                                           teacher, s["tc"], co.c_nll, co.c_kl)

        def loss_at_the_end(module, args, output):
            if "loss" not in seen:
                raise TrainError(f"{type(top).__name__}: its forward never called its lm_head module, where SelfAug's "
                                 "loss is computed; this model is not supported")
            output["loss"] = seen.pop("loss")
            return output

        inputs = model_inputs(batch)
        if s.get("keep_one") is None:  # asked once: whether the model's forward can skip its own full head
            forward = (top.get_base_model() if hasattr(top, "get_base_model") else top).forward
            s["keep_one"] = "logits_to_keep" in inspect.signature(forward).parameters
        if s["keep_one"]:
            inputs["logits_to_keep"] = 1  # the model's own head on one position; the loss applies it in chunks
        hooks = [body.register_forward_hook(keep_hidden), head.register_forward_pre_hook(loss_at_head),
                 top.register_forward_hook(loss_at_the_end, prepend=True)]
        try:
            output = model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        return output["loss"], *seen["sums"], output

    # ---- checks and logs -----------------------------------------------------------------------------

    def _selfaug_check_teacher(self, kl_sum, positions: int) -> None:
        """The first micro-batch of a fresh run: the model must be the store's teacher (`check_start`)."""
        total, count = dist.all_reduce_sum([float(kl_sum), positions])
        self._selfaug["check"] = False
        StoredSignal(self._selfaug["store"]).check_start(total, count, "check_teacher=False")

    def _selfaug_check_step(self, step: int) -> None:
        s = self._selfaug
        sums, s["step_sums"] = s["step_sums"], None
        if sums is None:
            return
        total = torch.as_tensor(dist.all_reduce_sum(sums.detach().cpu().numpy()))  # the step's NLL and KL means
        if not torch.isfinite(total).all():
            raise TrainError(f"optimizer step {step}: the loss is not finite (nll {total[0].item()}, kl "
                             f"{total[1].item()}); check the teacher store (`selfaug inspect`), the learning rate "
                             "and the data")
        s["log_sums"] = total if s["log_sums"] is None else s["log_sums"] + total
        s["log_steps"] += 1
        s["alpha"].observe(float(total[1]))  # the step's KL mean over all ranks: the same next alpha everywhere
        if s["alpha"].state_dict() is not None:  # saved with every checkpoint of the trainer
            self.state.stateful_callbacks[ALPHA_STATE] = s["alpha"].state_dict()

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The trainer's logs, and beside a training `loss` the step means of `nll` and `kl` since the last
        log and the current `alpha` (so every `report_to` logger gets them)."""
        s = self._selfaug
        if "loss" in logs and s["log_steps"]:
            logs["nll"] = float(s["log_sums"][0]) / s["log_steps"]
            logs["kl"] = float(s["log_sums"][1]) / s["log_steps"]
            logs["alpha"] = s["co"].alpha
            s["log_sums"], s["log_steps"] = None, 0
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The trainer's own save (a peft adapter or a model directory), and `selfaug_trainer.json`: the
        store it trained against and the SelfAug options."""
        super().save_model(output_dir, _internal_call)
        out = output_dir or self.args.output_dir
        if self.args.should_save:
            tc, teacher = self._selfaug["tc"], self._selfaug["store"]
            with open(os.path.join(out, "selfaug_trainer.json"), "w") as f:
                json.dump({"teacher_store": os.path.abspath(teacher.dir), "store_settings": teacher.manifest["settings"],
                           **{k: getattr(tc, k) for k in OPTIONS}}, f, indent=2, default=str)


class SelfAugTrainer(SelfAugMixin, Trainer):
    """`transformers.Trainer` with SelfAug from a teacher store: see `SelfAugMixin`."""
