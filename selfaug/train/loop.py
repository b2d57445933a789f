"""Stage 2 (docs/design.md, "Stage 2"): fine-tune on a plain loop over a `deepspeed.initialize` engine
with loss = NLL(response) + alpha(step) * KL(prompt), the teacher from the source chosen in setup.

setup -> train -> save_final, top to bottom; the run's state is one `Run`. Normalization: both terms
are sums divided once by the token counts of the whole optimizer step (all micro-batches, all
ranks). DeepSpeed averages gradients over data-parallel ranks, so each micro-batch's loss is
multiplied by the world size, and `backward(scale_wrt_gas=False)` on a new tensor
(`objective.for_engine_backward`) stops it dividing by the accumulation steps, on every ZeRO stage.

Under ZeRO-3 the model is created partitioned (no rank holds it whole); the chunked loss applies the
lm_head itself, so the head is registered as an external parameter of the objective: gathered for
the loss, released after, and (when it trains) its gradient reduced like every other parameter's.
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .. import dist, locks, store
from ..config import Config, check_paths
from ..errors import SelfAugError
from ..models import attention_width, check_head, load_all, partition_line, resolve_dtype, vocab_size
from . import checkpoint, metrics, preemption, retention, validation
from .final import save_final, save_hf_checkpoint, zero_stage
from .batches import Layout, StepSampler, layout_for, step_counts, to_device
from .prefetch import Prefetcher
from .alpha import DriftBudget, Schedule, alpha_control
from .objective import Coefficients, Objective, coefficients, for_engine_backward, lora_config, lr_factor
from .sources import DataExamples, LiveModel, PlainData, StoredSignal, TeacherSource


class TrainError(SelfAugError, RuntimeError):
    """A run that cannot go on correctly (a non-finite loss, an unsupported combination)."""


def ds_config(cfg: Config, world: int, on_gpu: bool) -> dict:
    """The JSON of train.deepspeed with its "auto" values filled from the recipe, and the monitors
    of train.report_to."""
    tc = cfg.train
    device = "cuda" if on_gpu else "cpu"
    bf16 = resolve_dtype(cfg.model.dtype, device) == torch.bfloat16
    conf = dist.deepspeed_config(tc.deepspeed, {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "train_batch_size": tc.micro_batch_size * tc.gradient_accumulation_steps * world, "gradient_clipping": tc.max_grad_norm,
        "bf16.enabled": bf16, "fp16.enabled": False,
        "optimizer.params.lr": tc.learning_rate, "optimizer.params.weight_decay": tc.weight_decay,
    })
    # bf16 weights train with DeepSpeed's bf16 section (fp32 master weights and optimizer state), on a GPU or
    # a CPU alike; a config that says otherwise about the dtypes is refused here, before any model loads
    if conf.get("fp16", {}).get("enabled"):
        raise TrainError(f"{tc.deepspeed} enables fp16: selfaug computes the head's gradients in the forward, before "
                         "DeepSpeed's loss scale applies, so fp16 would flush the small KL gradients to zero; use bf16 "
                         "(model.dtype=bfloat16, \"bf16\": {\"enabled\": \"auto\"}) or float32")
    if conf.get("bf16", {}).get("enabled") and not bf16:
        raise TrainError(f"{tc.deepspeed} enables bf16 but model.dtype={cfg.model.dtype} resolves to "
                         f"{resolve_dtype(cfg.model.dtype, device)}: set model.dtype=bfloat16, or \"bf16\": "
                         "{\"enabled\": \"auto\"}")
    if not on_gpu and "optimizer" in conf:
        conf["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's CPU Adam compiles for ~40 s
        conf["zero_force_ds_cpu_optimizer"] = False
    logs = os.path.abspath(os.path.join(tc.output_dir, "logs"))
    for target in tc.report_to:
        if target == "tensorboard":
            conf["tensorboard"] = {"enabled": True, "output_path": logs, "job_name": "tensorboard"}
        elif target == "csv":
            conf["csv_monitor"] = {"enabled": True, "output_path": logs, "job_name": "csv"}
        elif target == "wandb":
            # selfaug's own W&B run (rank 0, `_wandb_run`), not DeepSpeed's monitor: the engine logs its
            # Train/Samples events at the sample count as step, and W&B drops any later step below it
            os.environ.setdefault("WANDB_DIR", logs)  # the run's files (offline: what `wandb sync` uploads)
    return conf


@dataclass
class Run:
    """Everything a training step needs, made once by setup()."""
    cfg: Config
    engine: Any
    tok: Any
    source: TeacherSource  # StoredSignal | LiveModel | PlainData
    sampler: StepSampler
    lengths: store.Lengths
    rank: int
    world: int
    device: torch.device
    layout: Layout | None = None  # how micro-batches become rows (train.packing, the model's attention)
    identity: dict | None = None  # what a checkpoint's run must share with this one (checkpoint.run_identity)
    stop: Any = None  # preemption.StopFlag: set by train.exit_signals
    alpha: Schedule | DriftBudget | None = None  # alpha at each step (alpha.alpha_control); checkpointed
    wandb: Any = None  # the W&B run (train.report_to=wandb), rank 0
    check_start: bool = False  # a fresh run with a stored teacher: its first micro-batch's KL must be ~0
    steps: int = 0  # the run's optimizer steps (train.max_steps, or train.num_epochs over the examples)
    stop_after: int | None = None  # setup(stop_after=N): checkpoint and return after step N
    lock: Any = None  # locks.DirLock of train.output_dir (rank 0): one job per directory
    held_out: Any = None  # validation.HeldOut: data.eval's examples for train.eval_steps


def _teacher_source(cfg: Config, loaded, model, device) -> TeacherSource:
    """The one place that decides where the examples and the teacher come from."""
    tc = cfg.train
    if tc.teacher_mode == "offline":
        url = cfg.teacher.output_dir if store.is_url(cfg.teacher.output_dir) else None
        # on object storage: this node's checked mirror, or by shards only the manifest and sidecars (each rank
        # then downloads its own shards as the plan reaches them)
        if url and tc.order != "shards" and dist.rank_world()[0] == 0:
            print(f"{url}: train.order=global reads every shard on every rank, so each node downloads the whole store "
                  "before step 1; train.order=shards downloads only each rank's share, during the steps", flush=True)
        # every rank pulls (a node's first, the others find it done); one node's failure ends every rank at once
        where = dist.together(lambda: store.pull(url, shards=tc.order != "shards")) if url else cfg.teacher.output_dir
        if not tc.kl_ever_on() and not os.path.exists(os.path.join(where, store.MANIFEST)):
            raise store.StoreError(f"{cfg.teacher.output_dir} is not a teacher store (no {store.MANIFEST}): with "
                                   "train.alpha=0 and teacher_mode=offline the run trains on the store's examples; "
                                   "for plain fine-tuning on the data set train.teacher_mode=none")
        teacher_store = (store.open_share(url, where, tc.verify_store) if url and tc.order == "shards" else
                         store.TeacherStore(where, verify=tc.verify_store))
        expected = store.store_settings(cfg, loaded.tok, vocab_size(model), loaded.dtype, loaded.examples.fingerprint)
        store.check_store(cfg.teacher.output_dir, teacher_store.manifest, expected)
        # alpha = 0 with a store: the teacher rows still come along when the KL is monitored (train.monitor_kl_every)
        return StoredSignal(teacher_store) if tc.kl_ever_on() or tc.monitor_kl_every else PlainData(teacher_store)
    examples = DataExamples(loaded.examples, store.PositionRule.of(cfg.teacher))
    if not tc.kl_ever_on():
        return PlainData(examples)
    frozen = None
    if tc.adapter == "none":  # a frozen copy of the original model, whole on this rank
        frozen = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    return LiveModel(examples, frozen)


def _pack_tokens(cfg: Config, examples=None) -> int | None:
    """The longest packed row (train.packing); with the data's examples, this and train.micro_batch_tokens are
    checked against the longest example (before the model loads)."""
    tc = cfg.train
    cap = (tc.pack_tokens or cfg.data.max_seq_len) if tc.packing else None
    longest = examples.longest() if examples is not None else 0
    if cap is not None and longest > cap:
        raise TrainError(f"train.pack_tokens={cap} is smaller than the longest example ({longest} tokens): raise "
                         f"train.pack_tokens to at least {longest}, or leave it null (data.max_seq_len)")
    if tc.micro_batch_tokens is not None and longest > tc.micro_batch_tokens:
        raise TrainError(f"train.micro_batch_tokens={tc.micro_batch_tokens} is smaller than the longest example ({longest} "
                         f"tokens), which no micro-batch could hold: raise train.micro_batch_tokens to at least {longest}, "
                         "or lower data.max_seq_len (data.long_policy then skips or truncates the longer ones)")
    return cap


def setup(cfg: Config, objective_cls=None, stop_after: int | None = None) -> Run:
    """The run, ready for its first step. `stop_after`: save a checkpoint and return after that step (a Python
    keyword, not a recipe key: what tests of resume and benchmarks ask for)."""
    check_paths(cfg)
    if cfg.train.order == "shards" and store.is_url(cfg.teacher.output_dir):
        store.RankShards.ahead()  # $SELFAUG_SHARDS_AHEAD, checked before anything loads
    if cfg.train.eval_steps:
        validation.eval_source(cfg)  # held-out data to compute it on, before anything loads
    if cfg.model.dtype == "float16":
        raise TrainError("model.dtype=float16: the head's gradients are computed in the forward, before any loss "
                         "scale, so float16 would flush the small KL gradients to zero; use model.dtype=bfloat16 or "
                         "float32 (float16 is fine for `selfaug precompute`)")
    # the stop signals are caught from here on: one during start-up stops the run after its first step,
    # and none can kill a rank while it holds a lock (e.g. torch's build lock of DeepSpeed's compiled ops)
    stop = preemption.StopFlag(cfg.train.exit_signals, os.path.join(cfg.train.output_dir, "STOP"))
    lock = None
    try:
        dist.init(cfg.train.ddp_timeout)
        # one job per directory: a second run on this output_dir is refused here, before it touches anything
        lock = locks.hold(cfg.train.output_dir, "train")
        dist.decide(lambda: checkpoint.check_fresh(cfg))  # resume=never over a run only with train.overwrite
        run = _setup(cfg, objective_cls, stop)
        run.stop_after, run.lock = stop_after, lock
        return run
    except BaseException:
        stop.restore()
        if lock is not None:
            lock.release()
        raise


def _setup(cfg: Config, objective_cls, stop) -> Run:
    import deepspeed
    rank, world = dist.rank_world()  # the process group setup() made
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=dist.timeout(cfg))
    device = dist.device()
    tc = cfg.train
    if device.type == "cuda" and tc.tf32:  # fp32 matmuls on TF32 tensor cores (about 8x an fp32 matmul on H100)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    conf = ds_config(cfg, world, device.type == "cuda")
    conf = checkpoint.ds_config_for_resume(conf, cfg, world)  # a resume at another world size loads universal
    zero3 = conf.get("zero_optimization", {}).get("stage") == 3
    if zero3 and tc.adapter == "none" and tc.teacher_mode == "online" and tc.kl_ever_on():
        raise TrainError("teacher_mode=online with adapter=none (full fine-tuning) keeps a whole frozen copy of the model on every "
                         "rank, which ZeRO-3 is there to avoid: precompute the store and use teacher_mode=offline")
    torch.manual_seed(tc.seed), random.seed(tc.seed), np.random.seed(tc.seed)
    loaded = load_all(cfg, device, ds_config=conf, check=lambda ex: _pack_tokens(cfg, ex))  # partitioned under ZeRO-3
    model = loaded.model
    line = partition_line(model, rank)
    if line:
        print(line, flush=True)
    source = _teacher_source(cfg, loaded, model, device)
    lengths = source.examples.lengths()
    layout = layout_for(model.config._attn_implementation, tc.packing, _pack_tokens(cfg),
                        attention_width(model.config))
    if tc.packing and rank == 0:
        print(f"packing under {model.config._attn_implementation}: {layout.name}", flush=True)

    if tc.gradient_checkpointing:
        # non-reentrant: no input that requires grad is needed, and it works under ZeRO-3's hooks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.adapter == "lora":
        from peft import get_peft_model
        model.requires_grad_(False)
        torch.manual_seed(tc.seed)  # the adapters' init depends on the seed alone
        model = get_peft_model(model, lora_config(tc))
    elif tc.freeze_lm_head:
        model.get_output_embeddings().requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    objective = (objective_cls or Objective)(model, tc, source)
    objective.train()  # from_pretrained returns eval mode; checkpointing runs only in training mode
    steps = tc.total_steps(len(source.examples), world)
    params = [p for p in objective.parameters() if p.requires_grad]
    if "optimizer" in conf:  # the ds_config's own (e.g. DeepSpeed's CPU Adam for offload)
        optimizer = None
    elif tc.optim == "sgd":
        optimizer = torch.optim.SGD(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        conf["zero_allow_untested_optimizer"] = True
    else:
        optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    from torch.optim.lr_scheduler import LambdaLR
    engine, _, _, _ = deepspeed.initialize(model=objective, model_parameters=params, optimizer=optimizer, config=conf,
                                           lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_factor(s, tc, steps)))
    if zero_stage(engine) == 3:
        objective.setup_zero3_head()
        check_head(objective.model)  # the head contract, the forward gathering as the steps' will
    examples = source.examples
    sampler = StepSampler(len(examples), tc.micro_batch_size, tc.gradient_accumulation_steps, world, tc.seed,
                          lengths.tokens, tc.micro_batch_tokens, layout,
                          examples.shard_rows() if tc.order == "shards" else None)
    if tc.order == "shards" and sampler.left_out and rank == 0:
        print(f"train.order=shards: {sampler.left_out} of {len(examples)} examples per epoch fall after the last "
              f"rank's part ({sampler.part} examples each for {world} ranks); which ones changes with each epoch",
              flush=True)
    settings = examples.manifest["settings"] if isinstance(examples, store.TeacherStore) else None
    return Run(cfg, engine, loaded.tok, source, sampler, lengths, rank, world, device, layout,
               checkpoint.run_identity(cfg, settings), stop, _alpha(cfg, rank, steps), steps=steps)


def _alpha(cfg: Config, rank: int, steps: int):
    """alpha at each step (`alpha.alpha_control`), with a line saying how a drift budget will steer it."""
    control = alpha_control(cfg.train, steps)
    if isinstance(control, DriftBudget) and rank == 0:
        how = "auto: a twentieth of the run's " if cfg.train.drift_horizon == "auto" else ""
        print(f"drift budget {control.budget:g} nats per KL position: alpha from {control.alpha:g}, horizon "
              f"{control.horizon:g} steps ({how}{steps} steps)", flush=True)
    return control


def step_coefficients(run: Run, step: int) -> Coefficients:
    """The step's coefficients from the global batch's counts (`objective.coefficients`)."""
    n_nll, n_kl = step_counts(run.lengths, run.sampler.global_batch(step))
    return coefficients(run.world, run.alpha.at(step), n_nll, n_kl)


class StepTotals(NamedTuple):
    """One optimizer step over all ranks: [nll_sum, kl_sum], the examples' tokens, the tokens the model
    processed (padding included: packing brings it down), and whether any rank was asked to stop."""
    sums: torch.Tensor
    tokens: int
    processed: int
    stop: bool = False
    kl_measured: bool = True  # False: the step computed no KL (alpha = 0 between monitor steps)


def kl_measured(run: Run, step: int) -> bool:
    """Whether the step computes the KL: always when the loss has a KL term; with alpha = 0 and a store, at the
    first step of a fresh run (the teacher check) and every train.monitor_kl_every steps, without gradient."""
    tc = run.cfg.train
    if tc.kl_ever_on():
        return True
    if not isinstance(run.source, StoredSignal):
        return False
    return run.check_start or (tc.monitor_kl_every > 0 and (step + 1) % tc.monitor_kl_every == 0)


def train_step(run: Run, step: int, co: Coefficients, data: Prefetcher | None = None) -> StepTotals:
    """One optimizer step over this rank's micro-batches of the step's plan (`prefetch.micro_batches`: an
    empty one, where this rank has fewer than another, runs with weight 0), made by `data` (a background thread
    ahead of the step, or now)."""
    engine, device = run.engine, run.device
    data = data or Prefetcher(run, step, 0)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nll, kl: summed on the device, no sync per micro-step
    tokens = processed = 0  # the examples' tokens and the processed ones, counted on the host
    with_kl = kl_measured(run, step)
    for host, weight, last in data.get(step):
        batch = to_device(host, device, non_blocking=True)  # from pinned memory on a GPU: the host does not wait
        engine.set_gradient_accumulation_boundary(last)  # the micro-batch count varies by step
        loss, nll, kl = engine(batch, weight * co.c_nll, weight * co.c_kl, with_kl)
        if run.check_start:  # before any update: the model is the store's teacher (one all-reduce, at step 0)
            run.check_start = False
            run.source.check_start(*dist.all_reduce_sum([weight * float(kl), weight * batch["rows_b"].numel()]),
                                   "train.check_teacher=false")
        engine.backward(for_engine_backward(loss), scale_wrt_gas=False)  # divided once, by the step's counts
        engine.step()  # DeepSpeed applies the update at the accumulation boundary only
        totals += weight * torch.stack([nll.double(), kl.double()])  # on the device: no sync per micro-step
        tokens, processed = tokens + weight * batch["tokens"], processed + batch["padded_tokens"]  # host ints
    # a signal to any rank, or the run's STOP file (launch.sh touches it: it reaches ranks on other nodes), stops
    # every rank at this step
    stop = float(run.stop is not None and (run.stop.requested or run.stop.file_seen()))
    totals = torch.cat([totals, torch.tensor([tokens, processed, stop], dtype=torch.float64, device=device)])
    if run.world > 1:  # one small all-reduce per optimizer step: logging, the finiteness check, a stop request
        torch.distributed.all_reduce(totals)
    totals = totals.cpu()  # the one host sync of the step
    if not torch.isfinite(totals[:2]).all():
        # DeepSpeed would skip such a step ("OVERFLOW") and go on: a skipped step is an error here
        bad = [name for name, v in zip(("nll", "kl"), totals[:2].tolist()) if not math.isfinite(v)]
        raise TrainError(f"optimizer step {step + 1}: the {' and '.join(bad)} term{'s are' if len(bad) > 1 else ' is'} "
                         "not finite "
                         f"(nll sum {totals[0].item()}, kl sum {totals[1].item()}); check the teacher store "
                         "(`selfaug inspect`), train.learning_rate and the data")
    return StepTotals(totals[:2], int(totals[2].item()), int(totals[3].item()), bool(totals[4].item() > 0), with_kl)


def train(cfg: Config, stop_after: int | None = None) -> str:
    """Stage 2 from a recipe, to final/ (or, with `stop_after`, to the checkpoint of that step)."""
    run = setup(cfg, stop_after=stop_after)
    try:
        return _train(run)
    finally:
        if run.wandb is not None:
            run.wandb.finish(exit_code=0 if run.stop.requested or sys.exc_info()[0] is None else 1)
        if not run.stop.requested:  # a stopped run ignores further signals until it exits
            run.stop.restore()
        if run.lock is not None:
            run.lock.release()


def _train(run: Run) -> str:
    cfg = run.cfg
    tc, rank = cfg.train, run.rank
    out = tc.output_dir
    def prepare() -> None:  # rank 0; a failure (a full disk) reaches every rank before any collective of the run
        os.makedirs(out, exist_ok=True)
        cfg.save(os.path.join(out, "config.yaml"))
    dist.decide(prepare)
    exits = os.path.join(out, ".exit")  # each rank's exit status where launch.sh finds it on any node
    os.makedirs(exits, exist_ok=True)
    preemption.RUN_EXIT_DIR = exits  # this run's, not an earlier one's in the same process
    start = checkpoint.resume(run, run.identity)
    run.check_start = start == 0 and tc.check_teacher and isinstance(run.source, StoredSignal)
    metrics_path = os.path.join(out, "metrics.jsonl")
    dist.decide(lambda: metrics.truncate(metrics_path, start))  # rank 0; its failure on every rank
    run.wandb = metrics.wandb_run(cfg, rank)
    if tc.eval_steps:
        run.held_out = validation.HeldOut(cfg, run.tok, rank, run.world)
    data = Prefetcher(run, start, tc.prefetch)  # the micro-batches, made ahead on a thread
    try:
        return _loop(run, start, data, metrics_path)
    finally:
        run.source.examples.close()  # first: a prefetch thread waiting for a shard is told, and can end
        data.close()
        if isinstance(run.source.examples, store.RankShards):  # what this rank downloaded and held
            run.source.examples.report(out, rank)


def _loop(run: Run, start: int, data: Prefetcher, metrics_path: str) -> str:
    tc, rank, out = run.cfg.train, run.rank, run.cfg.train.output_dir
    # the bar is closed on the way out, also by an error, so that the error starts on a line of its own
    with tqdm(total=run.steps, initial=start, desc="train", unit="step", disable=rank != 0) as bar:
        for step in range(start, run.steps):
            t0, waited = time.time(), data.waited
            co = step_coefficients(run, step)
            plan = run.sampler.plan(step)
            got = train_step(run, step, co, data)
            dt = time.time() - t0
            nll_mean, kl_mean = got.sums[0].item() / max(co.n_nll, 1), got.sums[1].item() / max(co.n_kl, 1)
            row = {"step": step + 1, "loss": nll_mean + co.alpha * kl_mean, "nll": nll_mean,
                   # the KL and its positions only where the step measured it: never a 0 that was not computed
                   **({"kl": kl_mean, "kl_positions": co.n_kl} if got.kl_measured else {}),
                   "alpha": co.alpha, "lr": tc.learning_rate * lr_factor(step, tc, run.steps), "tokens_per_s": got.tokens / dt,
                   "step_time_s": dt, "nll_tokens": co.n_nll,
                   "data_wait_s": data.waited - waited, "padding": 1 - got.tokens / max(got.processed, 1),
                   **run.sampler.plan_stats(plan)}
            if tc.drift_budget is not None:
                row["drift_budget"] = tc.drift_budget
            norm = run.engine.get_global_grad_norm()  # before clipping; None where DeepSpeed computes none (ZeRO-0 fp32)
            if norm is not None and not math.isfinite(float(norm)):  # every rank: the same all-reduced norm
                raise TrainError(f"optimizer step {step + 1}: the gradient norm is {float(norm)}, and DeepSpeed skipped "
                                 "the update; lower train.learning_rate, check the data, or use bf16 or fp32")
            if norm is not None:
                row["grad_norm"] = float(norm)
            run.alpha.observe(kl_mean)  # every rank: the same all-reduced KL, the same next alpha
            evaluated = run.held_out is not None and ((step + 1) % tc.eval_steps == 0 or step + 1 == run.steps)
            if evaluated:  # every rank its share of data.eval, one all-reduce; the row is logged
                row.update(validation.eval_nll(run, run.held_out))
            if rank == 0:
                if (step + 1) % tc.logging_steps == 0 or step + 1 == run.steps or evaluated:
                    metrics.log(run, metrics_path, row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", nll=f"{nll_mean:.3f}",
                                **({"kl": f"{kl_mean:.4f}"} if got.kl_measured else {}))
            done = step + 1
            if got.stop or (tc.save_steps and done % tc.save_steps == 0) or done == run.stop_after:
                path, seconds = checkpoint.save(run, done, run.identity,
                                                (lambda p: save_hf_checkpoint(run, p)) if tc.save_hf else None)
                # only now, with the new one whole and named by `latest`, may older ones go (rank 0; its failure on all)
                dist.decide(lambda: retention.rotate(os.path.dirname(path), tc.save_total_limit, os.path.basename(path)))
            if got.stop:
                run.stop.finish(done, path, seconds)
            if done == run.stop_after:
                return out
    save_final(run)
    return out
