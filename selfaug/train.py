"""Stage 2: fine-tune on a plain loop over a `deepspeed.initialize` engine with
loss = NLL(response) + alpha(step) * KL(prompt), the teacher read from the store (offline) or run live.

setup -> train -> save_final, top to bottom. Normalization (DESIGN.md): both terms are sums divided
once by the token counts of the whole optimizer step (all micro-batches, all ranks). DeepSpeed
averages gradients over data-parallel ranks, so each micro-batch's loss is multiplied by the world
size, and `backward(scale_wrt_gas=False)` stops it dividing by the accumulation steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from . import teacher_store as ts
from .config import Config
from .data import build_examples, read_records
from .loss import LiveTeacher, StoredTeacher, kl_sum, nll_sum, shifted_labels
from .models import decoder_and_head, load_model, load_tokenizer, resolve_dtype
from .precompute import store_settings
from .reader import OnlineExamples, StepSampler, check_store, collate, step_counts


def alpha_at(step: int, cfg) -> float:
    """alpha(step): constant, or linear / cosine from alpha_start to alpha over the run."""
    if cfg.alpha_schedule == "constant":
        return cfg.alpha
    frac = min(step / max(cfg.max_steps - 1, 1), 1.0)
    if cfg.alpha_schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.alpha_start + (cfg.alpha - cfg.alpha_start) * frac


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def lora_config(tc):
    from peft import LoraConfig
    return LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout, bias="none",
                      target_modules=[m.strip() for m in tc.lora_target_modules.split(",") if m.strip()],
                      task_type="CAUSAL_LM")


def ds_config(cfg: Config, world: int, on_gpu: bool) -> dict:
    """The JSON of train.deepspeed with its "auto" values filled from the recipe."""
    with open(cfg.train.deepspeed) as f:
        conf = json.load(f)
    tc = cfg.train
    fill = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world, "gradient_clipping": tc.max_grad_norm,
        "bf16.enabled": on_gpu and resolve_dtype(cfg.model.dtype, "cuda") == torch.bfloat16,
        "fp16.enabled": False, "optimizer.params.lr": tc.lr, "optimizer.params.weight_decay": tc.weight_decay,
    }

    def walk(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif value == "auto":
                if dotted not in fill:
                    raise ValueError(f"{cfg.train.deepspeed}: no recipe value for \"auto\" at {dotted}")
                node[key] = fill[dotted]
    walk(conf)
    if not on_gpu and "optimizer" in conf:
        conf["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's CPU Adam compiles for ~40 s
        conf["zero_force_ds_cpu_optimizer"] = False
    return conf


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0


class Objective(torch.nn.Module):
    """The module the engine wraps: forward(batch) -> (loss, nll_sum, kl_sum) for one micro-batch."""

    def __init__(self, model, tc, frozen_teacher=None):
        super().__init__()
        self.model = model
        self.tc = tc
        # not a submodule: DeepSpeed must neither train nor partition the full-fine-tuning teacher copy
        self.__dict__["frozen_teacher"] = frozen_teacher

    def gather_frozen_head(self) -> None:
        """Under ZeRO-3 keep a whole copy of the frozen lm_head for the chunked loss, gathered once.
        It never changes (LoRA freezes it), and the loss applies it outside any module hook."""
        import deepspeed
        _, head = decoder_and_head(self.model)
        params = [p for p in (head.weight, head.bias) if p is not None]
        if any(p.requires_grad for p in params):
            raise ValueError("under ZeRO-3 the lm_head must be frozen (method=lora, or method=full with "
                             "train.freeze_lm_head=true): the chunked loss applies it outside module hooks")
        with deepspeed.zero.GatheredParameters(params):
            self.__dict__["head_copy"] = tuple(p.detach().clone() for p in params) + ((None,) if head.bias is None else ())

    def _head(self, head):
        copy_ = self.__dict__.get("head_copy")
        return copy_ if copy_ is not None else (head.weight, head.bias)

    def _live_teacher(self, batch, weight, bias):
        with torch.no_grad():
            if self.frozen_teacher is not None:  # full fine-tuning: a frozen copy of the original model
                body, t_head = decoder_and_head(self.frozen_teacher)
                weight, bias = t_head.weight, t_head.bias
                ctx = contextlib.nullcontext()
            else:  # LoRA: the same model with its adapters disabled (the reference method)
                body, _ = decoder_and_head(self.model)
                ctx = self.model.disable_adapter()
            with ctx:
                h = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            return LiveTeacher(h[batch["rows_b"], batch["rows_t"]], weight.detach(),
                               None if bias is None else bias.detach())

    def forward(self, batch: dict, c_nll: float, c_kl: float):
        body, head = decoder_and_head(self.model)
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
        labels = shifted_labels(batch["input_ids"], batch["prompt_lens"], batch["lengths"])
        weight, bias = self._head(head)
        if c_kl == 0.0 and self.tc.alpha == 0.0:
            kl = torch.zeros((), device=hidden.device)  # plain fine-tuning: no teacher at all
        else:
            teacher = self._live_teacher(batch, weight, bias) if self.tc.teacher_mode == "online" else \
                StoredTeacher(batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"])
            kl, _ = kl_sum(hidden, weight, bias, batch["rows_b"], batch["rows_t"], teacher,
                           reverse=self.tc.kl_direction == "reverse", tail=self.tc.kl_tail,
                           chunk_rows=self.tc.loss_chunk_rows)
        nll, _ = nll_sum(hidden, weight, bias, labels, chunk_rows=self.tc.loss_chunk_rows)
        return c_nll * nll + c_kl * kl, nll.detach(), kl.detach()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(out_dir: str) -> str | None:
    latest = os.path.join(out_dir, "checkpoints", "latest")
    return os.path.join(out_dir, "checkpoints") if os.path.exists(latest) else None


def setup(cfg: Config, objective_cls=None):
    import deepspeed
    rank, world = dist.init()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = dist.device()
    tc = cfg.train
    torch.manual_seed(tc.seed), random.seed(tc.seed), np.random.seed(tc.seed)

    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_model(cfg.model.name_or_path, dtype, cfg.model.revision, cfg.model.attn_implementation)
    records, data_fp = read_records(cfg.data.train, cfg.data)
    if tc.teacher_mode == "offline" and not (tc.alpha == 0 and tc.alpha_schedule == "constant" and
                                             not os.path.exists(os.path.join(cfg.teacher.output_dir, ts.MANIFEST))):
        store = ts.TeacherStore(cfg.teacher.output_dir, verify=tc.verify_store)
        vocab = model.get_output_embeddings().weight.shape[0]
        check_store(cfg.teacher.output_dir, store.manifest, store_settings(cfg, tok, vocab, dtype, data_fp))
        examples, with_teacher = store, True
    else:  # online teacher, or plain fine-tuning without a store: tokenize the data here
        ex, _ = build_examples(records, tok, cfg.data, source=cfg.data.train)
        examples, with_teacher = OnlineExamples(ex, cfg.teacher.positions), False

    frozen = None
    if tc.method == "lora":
        from peft import get_peft_model
        model.requires_grad_(False)
        torch.manual_seed(tc.seed)  # the adapters' init depends on the seed alone
        model = get_peft_model(model, lora_config(tc))
    else:
        if tc.teacher_mode == "online" and tc.alpha > 0:
            frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        if tc.freeze_lm_head:
            model.get_output_embeddings().requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    objective = (objective_cls or Objective)(model, tc, frozen)
    conf = ds_config(cfg, world, device.type == "cuda")
    params = [p for p in objective.parameters() if p.requires_grad]
    if "optimizer" in conf:  # the ds_config's own (e.g. DeepSpeed's CPU Adam for offload)
        optimizer = None
    elif tc.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
        conf["zero_allow_untested_optimizer"] = True
    else:
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    from torch.optim.lr_scheduler import LambdaLR
    engine, _, _, _ = deepspeed.initialize(model=objective, model_parameters=params, optimizer=optimizer, config=conf,
                                           lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_factor(s, tc)))
    if zero_stage(engine) == 3:
        objective.gather_frozen_head()
    sampler = StepSampler(len(examples), tc.micro_batch_size, tc.grad_accum, world, tc.seed)
    return engine, tok, examples, with_teacher, sampler, rank, world, device


def train_step(engine, examples, sampler, step, c_nll, c_kl, pad_id, device, with_teacher, rank, world):
    """One optimizer step over grad_accum micro-batches. Returns (global [nll_sum, kl_sum], global tokens)."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll sum, kl sum, tokens: no sync per micro-step
    for m in range(engine.gradient_accumulation_steps()):
        rows = [examples.example(int(i)) for i in sampler.micro_batch(step, m, rank)]
        batch = collate(rows, pad_id, device, with_teacher)
        loss, nll, kl = engine(batch, c_nll, c_kl)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary only
        totals += torch.stack([nll.double(), kl.double(), batch["attention_mask"].sum().double()])
    if world > 1:  # one small all-reduce per optimizer step, for logging only
        torch.distributed.all_reduce(totals)
    totals = totals.cpu()  # the one host sync of the step
    return totals[:2], int(totals[2].item())


def step_coefficients(lengths, sampler, step, tc, world):
    """(c_nll, c_kl, n_nll, n_kl, alpha): each term's sum is divided once by its count over the whole
    step (all micro-batches, all ranks); x world because DeepSpeed averages gradients over ranks."""
    alpha = alpha_at(step, tc)
    n_nll, n_kl = step_counts(lengths, sampler.global_batch(step))
    return world / max(n_nll, 1), world * alpha / max(n_kl, 1), n_nll, n_kl, alpha


def train(cfg: Config) -> str:
    engine, tok, examples, with_teacher, sampler, rank, world, device = setup(cfg)
    tc = cfg.train
    out = tc.output_dir
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        cfg.save(os.path.join(out, "config.yaml"))
    start = _resume(engine, cfg, rank)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if rank == 0:
        _truncate_metrics(metrics_path, start)
    lengths = examples.lengths()
    bar = tqdm(total=tc.max_steps, initial=start, desc="train", unit="step", disable=rank != 0)
    for step in range(start, tc.max_steps):
        t0 = time.time()
        c_nll, c_kl, n_nll, n_kl, alpha = step_coefficients(lengths, sampler, step, tc, world)
        sums, tokens = train_step(engine, examples, sampler, step, c_nll, c_kl, tok.pad_token_id, device,
                                  with_teacher, rank, world)
        dt = time.time() - t0
        nll_mean, kl_mean = sums[0].item() / max(n_nll, 1), sums[1].item() / max(n_kl, 1)
        row = {"step": step + 1, "loss": nll_mean + alpha * kl_mean, "nll": nll_mean, "kl": kl_mean,
               "alpha": alpha, "lr": tc.lr * lr_factor(step, tc),
               "tokens_per_s": tokens / dt, "step_time_s": dt, "nll_tokens": n_nll, "kl_positions": n_kl}
        if rank == 0:
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", nll=f"{nll_mean:.3f}", kl=f"{kl_mean:.4f}")
        done = step + 1
        if (tc.save_every and done % tc.save_every == 0) or done == tc.stop_after:
            _save_checkpoint(engine, out, done, rank)
        if done == tc.stop_after:
            bar.close()
            return out
    bar.close()
    save_final(engine, cfg, tok, rank)
    return out


def _save_checkpoint(engine, out: str, step: int, rank: int) -> None:
    ckpt = os.path.join(out, "checkpoints")
    engine.save_checkpoint(ckpt, tag=f"step-{step}", client_state={"step": step})
    torch.save(_rng_state(), os.path.join(ckpt, f"step-{step}", f"rng_rank{rank}.pt"))
    dist.barrier()


def _resume(engine, cfg: Config, rank: int) -> int:
    """The optimizer step to start from: 0, or that of the checkpoint resumed from."""
    tc = cfg.train
    if tc.resume == "never":
        return 0
    ckpt = _latest_checkpoint(tc.output_dir) if tc.resume == "auto" else tc.resume
    if ckpt is None:
        return 0
    path, client = engine.load_checkpoint(ckpt)
    if path is None:
        raise RuntimeError(f"could not load a checkpoint from {ckpt}")
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    if rank == 0:
        print(f"resumed from {path} at step {client['step']}", flush=True)
    return int(client["step"])


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past the resumed step, so a resumed run's file equals an uninterrupted one's."""
    if not os.path.exists(path):
        return
    rows = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def save_final(engine, cfg: Config, tok, rank: int) -> str:
    """Hugging Face form under <output_dir>/final: the peft adapter (and merged model on request) or the
    full model. Under ZeRO-3 the parameters are gathered to rank 0 first."""
    final = os.path.join(cfg.train.output_dir, "final")
    model = engine.module.model
    if zero_stage(engine) == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the whole, others None
        state = {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None
    else:
        state = {k: v for k, v in model.state_dict().items()}
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        model.save_pretrained(final, state_dict=state)
        tok.save_pretrained(final)
        cfg.save(os.path.join(final, "selfaug_config.yaml"))
        if cfg.train.method == "lora" and cfg.train.merge_adapter:
            merge_adapter(cfg, final)
    dist.barrier()
    return final


def merge_adapter(cfg: Config, final: str) -> str:
    from peft import PeftModel
    base = load_model(cfg.model.name_or_path, torch.float32, cfg.model.revision)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    target = os.path.join(final, "merged")
    merged.save_pretrained(target)
    load_tokenizer(cfg.model.name_or_path, cfg.model.revision).save_pretrained(target)
    return target


def run(cfg: Config) -> str:
    return train(cfg)
