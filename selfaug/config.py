"""Recipe configuration: typed, flat, strict sections loaded from YAML plus `section.key=value` overrides
(docs/design.md, "Configuration").

Each field carries its type (allowed values as `Literal[...]`), its default, its help text and, for
numbers, its range, all on the field itself. Every key but `model.name_or_path` and `data.train` has a
default. An unknown section or key, a value outside its allowed set or range (NaN included) is an
error that names the key. The resolved config is saved beside every output; `selfaug config RECIPE`
prints it with each key's help.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from . import shipped
from .errors import SelfAugError

REQUIRED = "<required>"


class ConfigError(SelfAugError, ValueError):
    pass


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, path: bool = False):
    """A config field: its default, its help and, for numbers, its allowed range; `path`: a file that must exist."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path})


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
    batch_tokens: int = opt(8192, "token budget of a length-bucketed stage-1 batch", ge=1)
    vocab_chunk_rows: int = opt(512, "positions per log_softmax/top-k chunk", ge=1)
    deepspeed: Optional[str] = opt(None, "ZeRO-3 inference config (ds_configs/zero3_inference.json): the teacher is "
                                         "partitioned over all ranks; null: one whole teacher per rank", path=True)
    overwrite: bool = opt(False, "replace a store made from other settings (or an unreadable one)")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/train", "the run's directory (metrics, checkpoints, final/)")
    method: Literal["lora", "full"] = opt("lora", "LoRA adapters or full fine-tuning")
    teacher_mode: Literal["offline", "online", "none"] = opt(
        "offline", "offline: read the store; online: live teacher, full vocabulary; none: plain fine-tuning on the "
                   "data, no store (alpha must be 0)")
    alpha: float = opt(0.5, "weight of the KL term; 0 = plain fine-tuning", ge=0)
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
    max_steps: int = opt(100, "optimizer steps", ge=1)
    micro_batch_size: int = opt(4, "examples per micro-batch per rank", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(2e-4, "peak learning rate", gt=0)
    optimizer: Literal["adamw", "sgd"] = opt("adamw", "adamw, or plain SGD (scale-sensitive: the normalization tests)")
    min_lr_ratio: float = opt(0.1, "final lr of the cosine decay, as a fraction of lr", ge=0, le=1)
    warmup_steps: int = opt(0, "linear warmup steps", ge=0)
    weight_decay: float = opt(0.0, "AdamW / SGD weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0)
    seed: int = opt(42, "seed of the sampler, the adapters' init and the run")
    packing: bool = opt(False, "pack each micro-batch's examples, with the same loss and gradients and less padding: "
                               "under sdpa/eager into the cheapest rows of <= pack_tokens (block-diagonal mask), "
                               "under flash-attention and other kernels into one varlen row (cu_seq_lens)")
    pack_tokens: Optional[int] = opt(None, "longest packed row under sdpa/eager (null: data.max_seq_len)", ge=2)
    batch_tokens: Optional[int] = opt(
        None, "cut each rank's share of a step's examples into micro-batches of at most this many processed tokens "
              "(padded rows, or packed rows with packing), balanced over the ranks; the same step, the same gradient "
              "(null: micro_batch_size examples per micro-batch)", ge=2)
    loss_chunk_rows: int = opt(1024, "positions per lm_head/loss chunk: bounds the (rows x vocabulary) buffer", ge=1)
    prefetch: int = opt(2, "micro-batches read from the store, collated and pinned ahead of the step on a background "
                           "thread (0: made on the training thread when the step needs them)", ge=0)
    tf32: bool = opt(True, "on a CUDA GPU, fp32 matmuls (an fp32 model, fp32 parts of a bf16 one) run on TF32 tensor "
                           "cores (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision('high'))")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, about 1.3x time)")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA scaling numerator", ge=1)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                   "comma-separated module names that get adapters")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only at the end)", ge=0)
    resume: str = opt("auto", "auto (latest checkpoint if any) | never | a checkpoint directory; the world size may "
                              "differ if micro_batch_size x grad_accum x world size (the global batch) is kept")
    exit_signals: str = opt("SIGTERM,SIGUSR1", "comma-separated signals that stop the run at the next optimizer step "
                                               "with a checkpoint and exit status 75 (preemption); empty: none")
    ddp_timeout: int = opt(3600, "seconds a collective waits for the other ranks before the run fails (NCCL and gloo; "
                                 "torch's NCCL default is 600): longer than the longest normal wait, rank 0 writing "
                                 "final/ or merging the adapter alone; `selfaug precompute` uses it too (its ranks "
                                 "meet only at the end)", ge=1)
    freeze_lm_head: bool = opt(False, "method=full: keep the lm_head (and tied embeddings) frozen")
    merge_adapter: bool = opt(False, "also save the merged model under final/merged")
    verify_store: Literal["sha256", "size"] = opt("sha256", "how the store's shards are verified before training")
    check_teacher: bool = opt(True, "a fresh run with a store checks that its first micro-batch's KL to the stored "
                                    "teacher is ~0 (the model is the store's teacher); false: start elsewhere on "
                                    "purpose (e.g. from an earlier fine-tune)")
    report_to: str = opt("none", "comma-separated: none | tensorboard | wandb | csv (DeepSpeed's monitors, rank 0); "
                                 "metrics.jsonl is always written")
    log_every: int = opt(1, "write metrics every N optimizer steps", ge=1)
    stop_after: Optional[int] = opt(None, "stop (with a checkpoint) after this step, for tests of resume", ge=1)

    def kl_ever_on(self) -> bool:
        """Whether any step of the run has a KL term: the one answer every guard uses."""
        if self.teacher_mode == "none":
            return False
        return self.alpha > 0 or (self.alpha_schedule != "constant" and self.alpha_start > 0)


@dataclass
class EvalConfig:
    output_dir: str = opt("runs/eval", "report.json, plots and the table go here")
    runs: str = opt("", "comma-separated run directories (the base model is always evaluated)")
    ifeval_path: Optional[str] = opt(None, "IFEval JSONL; defaults to the shipped development subset")
    max_ifeval_prompts: int = opt(64, "IFEval prompts evaluated", ge=1)
    max_rag_examples: int = opt(100, "held-out RAG examples evaluated", ge=1)
    max_drift_prompts: int = opt(32, "general prompts for the drift KL", ge=1)
    max_new_tokens: int = opt(256, "generation length for IFEval", ge=1)
    rag_max_new_tokens: int = opt(48, "generation length for RAG answers", ge=1)
    batch_size: int = opt(8, "generation batch size", ge=1)
    drift_k: int = opt(1024, "the base's top-k log-probs stored at every position of the drift texts (the bucket KL: "
                              "exact at k = vocabulary size, never above the exact KL below it)", ge=1)
    device_map: Optional[str] = opt(None, "auto: each evaluated model spread over every visible GPU (accelerate's "
                                         "device_map; one model in memory at a time); null: one device")


@dataclass
class StudyConfig:
    output_dir: str = opt("runs/study", "the study's stores, runs, evaluation, and study.json / study.md / study.png")
    seeds: int = opt(3, "seeds per arm (train.seed + 0, 1, ...: each changes the adapters' init and the order of "
                        "examples)", ge=1)
    arms: Optional[dict] = opt(None, "arms beside lora (train.alpha=0) and selfaug (the recipe as it is): "
                                     "{name: {section.key: value}}, e.g. {budget: {train.drift_budget: 0.02}}")
    resamples: int = opt(2000, "bootstrap resamples of each confidence interval", ge=2000)
    bootstrap_seed: int = opt(0, "the bootstrap's generator seed")


REPORT_TO = ("none", "tensorboard", "wandb", "csv")
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
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) is not None and type(None) in get_args(hint):
        return [a for a in get_args(hint) if a is not type(None)][0], True
    return hint, False


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type (and check a Literal's allowed values)."""
    hint, optional = _strip_optional(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
        return None
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not one of {list(allowed)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _check_range(value: Any, meta: dict, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for key, ok, words in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}={value!r} must be {words} {bound:g}")


def section_fields() -> dict:
    """{section: (dataclass, {key: (type hint, dataclasses.Field)})}: the schema, for building and for help."""
    out = {}
    for f in fields(Config):
        cls = get_type_hints(Config)[f.name]
        hints = get_type_hints(cls)
        out[f.name] = (cls, {g.name: (hints[g.name], g) for g in fields(cls)})
    return out


def build_config(raw: dict, overrides: list[str] = ()) -> Config:
    """Build a Config from a nested dict and `section.key=value` overrides; strict on unknown keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(raw).__name__}")
    schema = section_fields()
    sections = {}
    for name, value in raw.items():
        if name not in schema:
            raise ConfigError(f"unknown config section {name!r}; valid sections: {', '.join(schema)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {type(value).__name__} {value!r}")
        sections[name] = dict(value or {})
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in schema:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}; "
                              f"valid sections: {', '.join(schema)}")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        sections.setdefault(section, {})[key] = parsed
    cfg = Config(**{section: build_section(section, sections.get(section, {})) for section in schema})
    _check(cfg)
    return cfg


def build_section(section: str, raw: dict):
    """One section of a recipe from a mapping: unknown keys, wrong types, choices and ranges are
    ConfigErrors naming `section.key` (also used alone, e.g. the train options of `selfaug.hf`)."""
    cls, keys = section_fields()[section]
    values = {}
    for key, value in raw.items():
        if key not in keys:
            raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(keys)}")
        values[key] = _coerce(value, keys[key][0], f"{section}.{key}")
    obj = cls(**values)
    for key, (_, f) in keys.items():
        value = getattr(obj, key)
        if value == REQUIRED:
            raise ConfigError(f"{section}.{key} is required: set it in the recipe or pass {section}.{key}=...")
        _check_range(value, f.metadata, f"{section}.{key}")
    return obj


def _check(cfg: Config) -> None:
    """Checks that span fields."""
    # (warmup_steps > max_steps is allowed: a short smoke run of a recipe never reaches the peak lr)
    d = cfg.data
    from .data.formats import check_fields
    problem = check_fields(d.format, d.fields)
    if problem:
        raise ConfigError(problem)
    if d.builtin_max_documents is not None and d.builtin_max_documents < d.builtin_num_documents:
        raise ConfigError(f"data.builtin_max_documents={d.builtin_max_documents} must be >= "
                          f"data.builtin_num_documents={d.builtin_num_documents}")
    if cfg.teacher.signal == "sampled" and cfg.train.kl_direction == "reverse" and cfg.train.teacher_mode == "offline":
        raise ConfigError("train.kl_direction=reverse needs the student's own samples; a teacher.signal=sampled store "
                          "holds the teacher's: use kl_direction=forward, or teacher.signal=topk")
    t = cfg.train
    if t.teacher_mode == "none" and (t.alpha > 0 or (t.alpha_schedule != "constant" and t.alpha_start > 0)):
        raise ConfigError(f"train.teacher_mode=none is plain fine-tuning without a teacher, but train.alpha={t.alpha}"
                          f" (alpha_start={t.alpha_start}): set train.alpha=0, or teacher_mode=offline (a store) or "
                          "online")
    if t.drift_budget is not None:
        if t.alpha_min > t.alpha_max:
            raise ConfigError(f"train.alpha_min={t.alpha_min} is above train.alpha_max={t.alpha_max}: the drift "
                              "controller's alpha must fit between them")
        if t.alpha_schedule != "constant":
            raise ConfigError(f"train.drift_budget steers alpha itself: drop train.alpha_schedule={t.alpha_schedule} "
                              "(or drift_budget)")
        if t.alpha <= 0:
            raise ConfigError("train.drift_budget starts from train.alpha and multiplies it: set train.alpha > 0 "
                              "(e.g. 0.5)")
    if t.drift_horizon != "auto":
        try:
            ok = float(t.drift_horizon) > 0 and math.isfinite(float(t.drift_horizon))
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"train.drift_horizon={t.drift_horizon!r} must be auto or a number of steps > 0")
    import signal
    for name in (n.strip().upper() for n in t.exit_signals.split(",") if n.strip()):
        if not isinstance(getattr(signal, name if name.startswith("SIG") else "SIG" + name, None), signal.Signals):
            raise ConfigError(f"train.exit_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    targets = [t.strip() for t in cfg.train.report_to.split(",") if t.strip()]
    for t in targets:
        if t not in REPORT_TO:
            raise ConfigError(f"train.report_to: {t!r} is not one of {list(REPORT_TO)}")
    import importlib.util
    for t in targets:  # a logger that is not installed: one line now, not a traceback after the model loaded
        package = LOGGER_PACKAGES.get(t)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to={t} needs the {package} package, which is not installed: "
                              f"pip install \"selfaug[{t}]\" (or drop {t} from train.report_to)")


def check_paths(cfg: Config) -> None:
    """The files the recipe names (DeepSpeed configs) exist: checked before any model loads."""
    for section, (_, keys) in section_fields().items():
        for key, (_, f) in keys.items():
            value = getattr(getattr(cfg, section), key)
            if f.metadata.get("path") and value is not None and not os.path.isfile(shipped.resolve(value)):
                raise ConfigError(f"{section}.{key}: file {value!r} not found (paths are relative to "
                                  f"{os.getcwd()}, then the shipped ds_configs/ and recipes/); point it at an "
                                  "existing file, e.g. ds_configs/zero2.json")


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """A recipe file (under the current directory, else a shipped one: `recipes/tiny.yaml` works anywhere)."""
    path = shipped.resolve(path)
    if os.path.isdir(path):
        raise ConfigError(f"recipe {path!r} is a directory; pass a YAML file, e.g. recipes/tiny.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"recipe {path!r} not found (`selfaug recipes` lists the shipped ones)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from None
    try:
        return build_config(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None


def describe(cfg: Config) -> str:
    """The resolved recipe as YAML, each key followed by its help (and allowed values or range)."""
    lines = []
    for section, (_, keys) in section_fields().items():
        lines.append(f"{section}:")
        obj = getattr(cfg, section)
        for key, (hint, f) in keys.items():
            value = json.dumps(getattr(obj, key))  # a JSON scalar is a YAML scalar
            note = f.metadata.get("help", "")
            base, _ = _strip_optional(hint)
            if get_origin(base) is Literal:
                note += f" [{' | '.join(get_args(base))}]"
            bounds = [f"{w} {f.metadata[k]:g}" for k, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                      if f.metadata.get(k) is not None]
            if bounds:
                note += f" ({', '.join(bounds)})"
            lines.append(f"  {key}: {value:<24} # {note}")
    return "\n".join(lines)


def config_digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
