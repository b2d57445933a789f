"""The recipe's sections (docs/design.md, "Configuration"): every key of `model`, `data`, `teacher`, `train`,
`eval` and `study`, with its type (choices as `Literal[...]`, lists as `list[str]`), its default, its help and,
for numbers, its allowed range, all on the field itself (`opt`). Reading a recipe (YAML, overrides, the checks)
is `config.py`; `docs/configuration.md` is generated from these fields.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .durable import write_atomic

REQUIRED = "<required>"


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, path: bool = False):
    """A config field: its default, its help and, for numbers, its allowed range; `path`: a file that must exist."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    name_or_path: str = opt(REQUIRED, "HF hub id, local directory, builtin:smollm2-135m-instruct or builtin:tiny-llama")
    revision: Optional[str] = opt(None, "hub revision (ignored for local paths and built-ins)")
    dtype: DTYPES = opt("auto", "weights' dtype: auto = bf16 on GPU, fp32 on CPU")
    attn_implementation: str = opt(
        "sdpa", "transformers' attention implementation: sdpa, eager, flex_attention, flash_attention_2/3, a Hub "
                "kernel (org/repo) or a name registered with transformers.AttentionInterface; it decides how packed "
                "micro-batches are laid out (train.packing)")
    init: Literal["pretrained", "random"] = opt(
        "pretrained", "random: seeded random weights from name_or_path/config.json (shape studies; no weights read)")
    seed: int = opt(0, "seed of the random weights with model.init=random")
    chat_template: Optional[str] = opt(
        None, "the tokenizer's chat template replaced by this one: a Jinja string, or a file holding one (a base model "
              "has none; TRL's and axolotl's chat_template); part of the store's tokenizer fingerprint")


@dataclass
class DataConfig:
    train: str = opt(REQUIRED, "JSONL / Parquet path, Hugging Face dataset name, or builtin:rag")
    eval: Optional[str] = opt(None, "held-out RAG split; defaults to builtin:rag-eval when train is builtin:rag")
    split: str = opt("train", "split name when `train` is a Hugging Face dataset")
    format: Literal["auto", "chat", "rag", "crag", "msmarco", "hotpotqa", "dpr", "ragbench"] = opt(
        "auto", "the records' shape (train and eval): auto detects each record's by its keys; docs/design.md, "
                "\"Data formats\", gives each format's answer rule")
    fields: Optional[str] = opt(None, "rename the keys data.format reads, name=key,... (e.g. question=query,"
                                      "answer=response), for sets that copy a format under other names")
    unanswerable: Literal["error", "skip"] = opt(
        "error", "records without an answer (MS MARCO's 'No Answer Present.', an empty answer): an error, or "
                 "skipped and counted with their numbers")
    max_seq_len: int = opt(1024, "longest training sequence (prompt + response tokens)", ge=2)
    long_policy: Literal["skip", "truncate", "error"] = opt("skip", "what happens to longer examples (counted)")
    max_examples: Optional[int] = opt(None, "use the first N records only", ge=1)
    system_prompt: Optional[str] = opt(None, "system message added to RAG-form records")
    num_proc: int = opt(1, "processes that tokenize the data (datasets.map); the result is cached and shared by ranks",
                        ge=1)
    builtin_train_size: int = opt(2000, "builtin:rag: training records", ge=1)
    builtin_eval_size: int = opt(200, "builtin:rag: held-out records", ge=1)
    builtin_seed: int = opt(0, "builtin:rag: generator seed")
    builtin_num_documents: int = opt(4, "builtin:rag: documents per question (the least, with builtin_max_documents)",
                                     ge=1)
    builtin_max_documents: Optional[int] = opt(
        None, "builtin:rag: length-skewed sets: documents per question drawn from [num_documents, max_documents]", ge=1)
    builtin_extra_sentences: int = opt(
        0, "builtin:rag: length-skewed sets: each document gets 0..N extra sentences (drawn per document)", ge=0)


@dataclass
class TeacherConfig:
    output_dir: str = opt("runs/teacher", "the teacher store's directory")
    signal: Literal["topk", "sampled"] = opt(
        "topk", "topk: the k most likely tokens + the tail mass; sampled: `samples` draws from the full distribution "
                "(unique ids, counts, exact log-probs; unbiased KL)")
    k: int = opt(64, "signal=topk: log-probs stored per position", ge=1)
    samples: int = opt(16, "signal=sampled: draws per position (N)", ge=1, le=65535)
    positions: Literal["prompt", "response", "all"] = opt("prompt", "positions whose distribution enters the KL")
    position_fraction: float = opt(1.0, "store (and train the KL on) a seeded random round(fraction x P) of each "
                                        "example's P positions, at least one", gt=0, le=1)
    max_positions: Optional[int] = opt(None, "at most this many stored positions per example (null: no cap)", ge=1)
    seed: int = opt(0, "seed of the position subsets and the samples (per example id: any world size, any rerun)")
    value_dtype: Literal["float16", "float32"] = opt("float16", "dtype of the stored log-probs")
    compression: Literal["none", "lz4", "zstd"] = opt("none", "Arrow IPC buffer compression of the shards")
    shard_size: int = opt(256, "source records per chunk = per shard", ge=1)
    forward_tokens: int = opt(8192, "tokens (padded) per stage-1 forward: the examples are bucketed by length into "
                                     "batches of at most this many", ge=1)
    vocab_chunk_rows: int = opt(512, "positions per log_softmax/top-k chunk", ge=1)
    deepspeed: Optional[str] = opt(None, "ZeRO-3 inference config (ds_configs/zero3_inference.json): the teacher is "
                                         "partitioned over all ranks; null: one whole teacher per rank", path=True)
    overwrite: bool = opt(False, "replace a store made from other settings (or an unreadable one)")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/train", "the run's directory (metrics, checkpoints, final/)")
    adapter: Literal["lora", "none"] = opt("lora", "lora: LoRA adapters on the frozen model; none: full fine-tuning")
    teacher_mode: Literal["offline", "online", "none"] = opt(
        "offline", "offline: read the store; online: live teacher, full vocabulary; none: plain fine-tuning on the "
                   "data, no store (alpha must be 0)")
    alpha: float = opt(0.5, "weight of the KL term, added to the NLL: loss = NLL + alpha * KL (not a blend: the NLL "
                            "keeps weight 1); 0 = plain fine-tuning", ge=0)
    alpha_schedule: Literal["constant", "linear", "cosine"] = opt("constant", "alpha over the run, from alpha_start")
    alpha_start: float = opt(0.0, "alpha at step 0 for linear / cosine schedules", ge=0)
    drift_budget: Optional[float] = opt(
        None, "nats per KL position: alpha is steered so that the training KL stays near this budget, from "
              "train.alpha (adaptive KL controller; null: alpha as set)", gt=0)
    drift_horizon: str = opt("auto", "drift_budget: steps over which alpha moves by up to a factor e^0.2; auto: a "
                                     "twentieth of the run's optimizer steps (at least 1), so that alpha can move "
                                     "e^4-fold over a run of any length")
    alpha_min: float = opt(0.01, "drift_budget: the smallest alpha the controller may set", ge=0)
    alpha_max: float = opt(20.0, "drift_budget: the largest alpha the controller may set", gt=0)
    monitor_kl_every: int = opt(5, "alpha = 0 with a store: measure the KL to the stored teacher without gradient "
                                   "every N optimizer steps (and at the first), so that the curves show the drift "
                                   "plain fine-tuning causes; 0: never (no kl is logged where it is not measured)",
                                ge=0)
    kl_direction: Literal["forward", "reverse"] = opt("forward", "forward KL(p||q) (reference) or reverse KL(q||p)")
    kl_tail: Literal["bucket", "renormalize"] = opt("bucket", "bucket: exact merged-tail KL; renormalize: biased")
    deepspeed: str = opt("ds_configs/zero2.json", "DeepSpeed JSON config (\"auto\" values come from this recipe)",
                         path=True)
    max_steps: Optional[int] = opt(None, "optimizer steps; when set it wins over num_epochs (as in the HF Trainer)",
                                   ge=1)
    num_epochs: float = opt(1.0, "passes over the examples, when max_steps is null: num_epochs x (examples // global "
                                 "batch) steps, at least 1", gt=0)
    micro_batch_size: int = opt(4, "examples per micro-batch per rank", ge=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = opt(2e-4, "peak learning rate", gt=0)
    optim: Literal["adamw_torch", "sgd"] = opt("adamw_torch", "the optimizer, named as the HF Trainer names it "
                                                              "(a DeepSpeed config's own optimizer section wins)")
    lr_scheduler_type: Literal["cosine_with_min_lr", "linear", "cosine", "constant_with_warmup"] = opt(
        "cosine_with_min_lr", "the learning rate after the warmup, as transformers' schedule of this name computes it: "
                              "cosine_with_min_lr decays to min_lr_ratio x learning_rate (selfaug's default; the HF "
                              "Trainer's is linear), linear and cosine decay to 0, constant_with_warmup stays")
    min_lr_ratio: float = opt(0.1, "lr_scheduler_type=cosine_with_min_lr: the final learning rate as a fraction of "
                                   "learning_rate (transformers' min_lr_rate)", ge=0, le=1)
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to learning_rate", ge=0)
    warmup_ratio: float = opt(0.0, "warmup as a fraction of the run's optimizer steps, ceil(ratio x steps); set this or "
                                   "warmup_steps, not both", ge=0, lt=1)
    weight_decay: float = opt(0.0, "AdamW / SGD weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0)
    seed: int = opt(42, "seed of the sampler, the adapters' init and the run")
    packing: bool = opt(False, "pack each micro-batch's examples, with the same loss and gradients and less padding: "
                               "under sdpa/eager into the cheapest rows of <= pack_tokens (block-diagonal mask), "
                               "under flash-attention and other kernels into one varlen row (cu_seq_lens)")
    pack_tokens: Optional[int] = opt(None, "longest packed row under sdpa/eager (null: data.max_seq_len)", ge=2)
    micro_batch_tokens: Optional[int] = opt(
        None, "cut each rank's share of a step's examples into micro-batches of at most this many processed tokens "
              "(padded rows, or packed rows with packing), balanced over the ranks; the same step, the same gradient "
              "(null: micro_batch_size examples per micro-batch)", ge=2)
    order: Literal["global", "shards"] = opt(
        "global", "the examples' order: global: a seeded permutation of all of them per epoch (every rank reads every "
                  "shard); shards: the shards in a seeded order, each shard's examples in a seeded order, dealt to the "
                  "ranks in contiguous parts, so that each rank reads about 1/world of the shards (from object "
                  "storage it then downloads only those: docs/distributed.md)")
    loss_chunk_rows: int = opt(1024, "positions per lm_head/loss chunk: bounds the (rows x vocabulary) buffer", ge=1)
    prefetch: int = opt(2, "micro-batches read from the store, collated and pinned ahead of the step on a background "
                           "thread (0: made on the training thread when the step needs them)", ge=0)
    tf32: bool = opt(True, "on a CUDA GPU, fp32 matmuls (an fp32 model, fp32 parts of a bf16 one) run on TF32 tensor "
                           "cores (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision('high'))")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, about 1.3x time)")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA scaling numerator", ge=1)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters (a list, or a comma-separated string); [all-linear]: every linear layer but "
        "the head, as peft expands it")
    save_steps: int = opt(0, "checkpoint every N optimizer steps (0: only at the end)", ge=0)
    save_total_limit: Optional[int] = opt(
        None, "keep the newest N checkpoints: older ones are removed only once a new one is whole and "
              "checkpoints/latest names it, and latest's target never (null: keep all)", ge=1)
    save_hf: bool = opt(False, "also write each checkpoint's adapter (LoRA) or model (full) in Hugging Face form in "
                               "checkpoints/step-N/hf/ (peft, transformers, `selfaug eval` read it); full fine-tuning "
                               "under ZeRO-3 consolidates the 16-bit model on rank 0, as final/ does")
    resume: str = opt("auto", "auto (latest checkpoint if any) | never | a checkpoint directory; the world size may "
                              "differ if micro_batch_size x gradient_accumulation_steps x world size (the global "
                              "batch) is kept")
    overwrite: bool = opt(False, "with resume=never: start a new run in an output_dir that holds one (its "
                                 "checkpoints/latest is removed at once; metrics, checkpoints and final/ are replaced as "
                                 "the new run writes them); without it such a run is refused")
    exit_signals: list[str] = opt(["SIGTERM", "SIGUSR1"], "signals that stop the run at the next optimizer step with a "
                                                         "checkpoint and exit status 75 (preemption); []: none")
    ddp_timeout: int = opt(3600, "seconds a collective waits for the other ranks before the run fails (NCCL and gloo; "
                                 "torch's NCCL default is 600): longer than the longest normal wait, rank 0 writing "
                                 "final/ or merging the adapter alone; `selfaug precompute` uses it too (its ranks "
                                 "meet only at the end)", ge=1)
    freeze_lm_head: bool = opt(False, "adapter=none: keep the lm_head (and tied embeddings) frozen")
    merge_adapter: bool = opt(False, "also save the merged model under final/merged")
    verify_store: Literal["sha256", "size"] = opt("sha256", "how the store's shards are verified before training")
    check_teacher: bool = opt(True, "a fresh run with a store checks that its first micro-batch's KL to the stored "
                                    "teacher is ~0 (the model is the store's teacher); false: start elsewhere on "
                                    "purpose (e.g. from an earlier fine-tune)")
    report_to: list[str] = opt([], "loggers beside metrics.jsonl (always written), rank 0: tensorboard and csv "
                                   "(DeepSpeed's monitors), wandb (selfaug's own W&B run)")
    logging_steps: int = opt(1, "write metrics every N optimizer steps", ge=1)
    eval_steps: int = opt(0, "every N optimizer steps and at the last, the NLL per response token on data.eval's "
                             "examples (eval_nll and eval_tokens in that step's metrics row; every rank its share, no "
                             "KL: a store holds data.train's examples only); 0: never", ge=0)
    wandb_project: str = opt("selfaug", "report_to wandb: the W&B project")
    run_name: Optional[str] = opt(None, "report_to wandb: the run's name (null: the output directory's name)")
    wandb_mode: Literal["auto", "online", "offline"] = opt(
        "auto", "report_to wandb: auto = online when WANDB_API_KEY is set, `wandb login` stored a key (~/.netrc) or "
                "WANDB_MODE says so, else offline "
                "(the run is kept under output_dir/logs; `wandb sync` uploads it)")

    def total_steps(self, examples: int, world: int) -> int:
        """The run's optimizer steps: max_steps, else num_epochs passes over `examples` at the global batch."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = max(examples // (self.micro_batch_size * self.gradient_accumulation_steps * world), 1)
        return max(int(math.ceil(self.num_epochs * per_epoch)), 1)

    def kl_ever_on(self) -> bool:
        """Whether any step of the run has a KL term: the one answer every guard uses."""
        if self.teacher_mode == "none":
            return False
        return self.alpha > 0 or (self.alpha_schedule != "constant" and self.alpha_start > 0)


@dataclass
class EvalConfig:
    output_dir: str = opt("runs/eval", "report.json, plots and the table go here")
    runs: list[str] = opt([], "run directories (a list, or comma-separated): selfaug runs, HF model or adapter "
                              "directories (the base model is always evaluated)")
    ifeval_path: Optional[str] = opt(None, "IFEval JSONL; defaults to the shipped development subset")
    max_ifeval_prompts: int = opt(64, "IFEval prompts evaluated", ge=1)
    max_rag_examples: int = opt(100, "held-out RAG examples evaluated", ge=1)
    max_drift_prompts: int = opt(32, "general prompts for the drift KL", ge=1)
    max_new_tokens: int = opt(256, "generation length for IFEval", ge=1)
    rag_max_new_tokens: int = opt(48, "generation length for RAG answers", ge=1)
    batch_size: int = opt(8, "generation batch size", ge=1)
    drift_k: int = opt(1024, "the base's top-k log-probs stored at every position of the drift texts (the bucket KL: "
                              "exact at k = vocabulary size, never above the exact KL below it)", ge=1)
    device_map: Optional[Literal["auto", "balanced", "balanced_low_0", "sequential"]] = opt(
        None, "auto: each evaluated model spread over every visible GPU (accelerate's device_map, which also takes "
              "balanced, balanced_low_0, sequential; one model in memory at a time); null: one device")


@dataclass
class StudyConfig:
    output_dir: str = opt("runs/study", "the study's stores, runs, evaluation, and study.json / study.md / study.png")
    seeds: int = opt(3, "seeds per arm (train.seed + 0, 1, ...: each changes the adapters' init and the order of "
                        "examples)", ge=1)
    arms: Optional[dict] = opt(None, "arms beside lora (train.alpha=0) and selfaug (the recipe as it is): "
                                     "{name: {section.key: value}}, e.g. {budget: {train.drift_budget: 0.02}}")
    resamples: int = opt(2000, "bootstrap resamples of each confidence interval", ge=2000)
    bootstrap_seed: int = opt(0, "the bootstrap's generator seed")


REPORT_TO = ("tensorboard", "wandb", "csv")
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # what each logger imports (csv: nothing)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """The resolved recipe at `path`, whole or not at all (temporary name, fsync, rename)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
