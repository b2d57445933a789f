"""Recipe configuration: typed, flat, strict sections loaded from YAML plus `section.key=value` overrides.

Every key but `model.name_or_path` and `data.train` has a default. An unknown section or key is an
error that names it and lists the valid ones. The resolved config is saved beside every output.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

REQUIRED = "<required>"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name_or_path: str = REQUIRED  # HF id, local directory, or builtin:smollm2-135m-instruct / builtin:tiny-llama
    revision: Optional[str] = None  # hub revision (ignored for local paths and built-ins)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    train: str = REQUIRED  # JSONL / Parquet path, HF dataset name, or builtin:rag
    eval: Optional[str] = None  # held-out RAG split; defaults to builtin:rag-eval when train is builtin:rag
    split: str = "train"  # split name when `train` is a Hugging Face dataset
    max_seq_len: int = 1024  # longest training sequence (prompt + response tokens)
    long_policy: str = "skip"  # skip | truncate | error: what happens to longer examples (counted)
    max_examples: Optional[int] = None  # use the first N records only
    system_prompt: Optional[str] = None  # system message added to RAG-form records
    # built-in RAG generator
    builtin_train_size: int = 2000
    builtin_eval_size: int = 200
    builtin_seed: int = 0
    builtin_num_documents: int = 4


@dataclass
class TeacherConfig:
    output_dir: str = "runs/teacher"  # the store
    k: int = 64  # top-k log-probs stored per position
    positions: str = "prompt"  # prompt | response | all
    value_dtype: str = "float16"  # float16 | float32
    compression: str = "none"  # none | lz4 | zstd (Arrow IPC buffer compression)
    shard_size: int = 256  # examples per chunk = per shard
    batch_tokens: int = 8192  # token budget of a length-bucketed batch
    vocab_chunk_rows: int = 512  # positions per log_softmax/topk chunk
    overwrite: bool = False  # replace a store made from other settings


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    method: str = "lora"  # lora | full
    teacher_mode: str = "offline"  # offline (read the store) | online (live teacher, full vocabulary)
    alpha: float = 0.5  # weight of the KL term; 0 = plain fine-tuning
    alpha_schedule: str = "constant"  # constant | linear | cosine (from alpha_start to alpha)
    alpha_start: float = 0.0
    kl_direction: str = "forward"  # forward KL(p||q) | reverse KL(q||p)
    kl_tail: str = "bucket"  # bucket (exact merged-tail KL) | renormalize (biased)
    deepspeed: str = "ds_configs/zero2.json"
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: scale-sensitive, used by the normalization tests)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    loss_chunk_rows: int = 1024  # positions per lm_head/loss chunk
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    resume: str = "auto"  # auto (latest checkpoint if any) | never | a checkpoint directory
    freeze_lm_head: bool = False  # method=full: keep the lm_head (and tied embeddings) frozen; needed under ZeRO-3
    merge_adapter: bool = False  # also save the merged model under final/merged
    verify_store: str = "sha256"  # sha256 | size
    log_every: int = 1
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this step, for tests of resume


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    runs: str = ""  # comma-separated run directories (the base model is always evaluated)
    ifeval_path: Optional[str] = None  # IFEval JSONL; defaults to the shipped development subset
    max_ifeval_prompts: int = 64
    max_rag_examples: int = 100
    max_drift_prompts: int = 32
    max_new_tokens: int = 256
    rag_max_new_tokens: int = 48
    batch_size: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


CHOICES = {
    ("model", "dtype"): {"auto", "float32", "bfloat16", "float16"},
    ("data", "long_policy"): {"skip", "truncate", "error"},
    ("teacher", "positions"): {"prompt", "response", "all"},
    ("teacher", "value_dtype"): {"float16", "float32"},
    ("teacher", "compression"): {"none", "lz4", "zstd"},
    ("train", "method"): {"lora", "full"},
    ("train", "optimizer"): {"adamw", "sgd"},
    ("train", "teacher_mode"): {"offline", "online"},
    ("train", "alpha_schedule"): {"constant", "linear", "cosine"},
    ("train", "kl_direction"): {"forward", "reverse"},
    ("train", "kl_tail"): {"bucket", "renormalize"},
    ("train", "verify_store"): {"sha256", "size"},
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type."""
    if get_origin(hint) is not None and type(None) in get_args(hint):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        hint = [a for a in get_args(hint) if a is not type(None)][0]
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
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section_classes() -> dict:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def build_config(raw: dict, overrides: list[str] = ()) -> Config:
    """Build a Config from a nested dict and `section.key=value` overrides; strict on unknown keys."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    sections = _section_classes()
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = yaml.safe_load(value) if value != "" else ""
    for section in raw:
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(sections)}")
    built = {}
    for section, cls in sections.items():
        hints = get_type_hints(cls)
        valid = [f.name for f in fields(cls)]
        values = {}
        for key, value in raw.get(section, {}).items():
            if key not in valid:
                raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(valid)}")
            values[key] = _coerce(value, hints[key], f"{section}.{key}")
        obj = cls(**values)
        for key in valid:
            value = getattr(obj, key)
            if value == REQUIRED:
                raise ConfigError(f"{section}.{key} is required: set it in the recipe or pass {section}.{key}=...")
            allowed = CHOICES.get((section, key))
            if allowed and value not in allowed:
                raise ConfigError(f"{section}.{key}={value!r} is not one of {sorted(allowed)}")
        built[section] = obj
    cfg = Config(**built)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    positive = [("data", "max_seq_len"), ("teacher", "k"), ("teacher", "shard_size"), ("teacher", "batch_tokens"),
                ("teacher", "vocab_chunk_rows"), ("train", "max_steps"), ("train", "micro_batch_size"),
                ("train", "grad_accum"), ("train", "loss_chunk_rows")]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{section}.{key} must be positive")
    if cfg.train.alpha < 0:
        raise ConfigError("train.alpha must be >= 0")


def load_config(path: str, overrides: list[str] = ()) -> Config:
    if not os.path.exists(path):
        raise ConfigError(f"recipe {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections")
    try:
        return build_config(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None


def config_digest(d: dict) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
