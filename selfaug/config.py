"""Recipe configuration: typed, flat, strict sections loaded from YAML plus `section.key=value` overrides
(docs/design.md, "Configuration").

Each field carries its type (allowed values as `Literal[...]`), its default, its help text and, for
numbers, its range, all on the field itself. Every key but `model.name_or_path` and `data.train` has a
default. An unknown section or key, a value outside its allowed set or range (NaN included) is an
error that names the key; a key renamed to the ecosystem's name (`RENAMED`: learning_rate,
gradient_accumulation_steps, save_steps, logging_steps, adapter, ...) is one line naming the new one. Lists are
YAML lists (or comma-separated strings). The resolved config is saved beside every output; `selfaug config
--config RECIPE` prints it with each key's help.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from . import shipped
from .schema import (DTYPES, LOGGER_PACKAGES, REPORT_TO, REQUIRED, Config, DataConfig,  # noqa: F401
                     EvalConfig, ModelConfig, StudyConfig, TeacherConfig, TrainConfig, opt)
from .errors import SelfAugError


class ConfigError(SelfAugError, ValueError):
    pass


# keys renamed (most to a name the HF Trainer or axolotl uses): a recipe with the old name gets one line naming the
# new one; a config saved beside an earlier store or run (`load_config(..., saved=True)`) is read under the new names
RENAMED = {
    "train": {"lr": "learning_rate", "grad_accum": "gradient_accumulation_steps", "save_every": "save_steps",
              "log_every": "logging_steps", "method": "adapter", "optimizer": "optim", "batch_tokens": "micro_batch_tokens"},
    "teacher": {"batch_tokens": "forward_tokens"},
}
# who else uses a new name, as the rename's line says (transformers' TrainingArguments, which TRL's configs extend;
# axolotl's YAML); micro_batch_tokens and forward_tokens are selfaug's own
USED_BY = {"learning_rate": "the Hugging Face Trainer's and axolotl's name",
           "gradient_accumulation_steps": "the Hugging Face Trainer's and axolotl's name",
           "save_steps": "the Hugging Face Trainer's name", "logging_steps": "the Hugging Face Trainer's name",
           "optim": "the Hugging Face Trainer's name", "adapter": "axolotl's name"}
RENAMED_VALUES = {("train", "method"): {"full": "none"}, ("train", "optimizer"): {"adamw": "adamw_torch"}}
GONE = {("train", "stop_after")}  # test hooks an earlier version kept in the schema: dropped from saved configs


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
            raise ConfigError(f"{where}={value!r} is not one of {list(allowed)}{did_you_mean(value, allowed)}")
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
    if get_origin(hint) is list:  # a YAML list, or a comma-separated string (the command line's short form)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ConfigError(f"{where}: expected a list of strings (or a comma-separated string), got {value!r}")
        return [str(v) for v in value if str(v) != "" and str(v).lower() != "none"]
    return value


def did_you_mean(value: Any, choices, prefix: str = "") -> str:
    """'; did you mean X?' for the closest of `choices` to a mistyped name or value (difflib), else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


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


def build_config(raw: dict, overrides: list[str] = (), saved: bool = False) -> Config:
    """Build a Config from a nested dict and `section.key=value` overrides; strict on unknown keys. `saved`: a
    config written by an earlier version (beside a store or a run), whose renamed keys are read as the new ones."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(raw).__name__}")
    schema = section_fields()
    sections = {}
    for name, value in raw.items():
        if name not in schema:
            raise ConfigError(f"unknown config section {name!r}"
                              f"{did_you_mean(name, schema) or '; valid sections: ' + ', '.join(schema)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {type(value).__name__} {value!r}")
        sections[name] = dict(value or {})
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in schema:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}"
                              f"{did_you_mean(section, schema) or '; valid sections: ' + ', '.join(schema)}")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        sections.setdefault(section, {})[key] = parsed
    cfg = Config(**{section: build_section(section, sections.get(section, {}), saved) for section in schema})
    _check(cfg)
    return cfg


def build_section(section: str, raw: dict, saved: bool = False):
    """One section of a recipe from a mapping: unknown keys, wrong types, choices and ranges are
    ConfigErrors naming `section.key` (also used alone, e.g. the train options of `selfaug.hf`); a renamed key is
    one line naming its new name (`saved`: read under the new name)."""
    cls, keys = section_fields()[section]
    values = {}
    for key, value in raw.items():
        new = RENAMED.get(section, {}).get(key)
        if saved and (section, key) in GONE:
            continue
        if new is not None:
            if not saved:
                who = f" ({USED_BY[new]})" if new in USED_BY else ""
                raise ConfigError(f"{section}.{key} is now {section}.{new}{who}: rename it in the recipe")
            if new in raw:  # both names in a saved config: the new one holds
                continue
            key, value = new, RENAMED_VALUES.get((section, key), {}).get(value, value)
        if key not in keys:
            hint = did_you_mean(key, keys, f"{section}.")
            raise ConfigError(f"unknown key {section}.{key}" + (f"{hint} (selfaug config --reference lists every key)"
                                                               if hint else f"; valid keys of [{section}]: {', '.join(keys)}"))
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
    if cfg.train.warmup_steps and cfg.train.warmup_ratio:  # one warmup (transformers 5 holds both in warmup_steps)
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} and train.warmup_ratio={cfg.train.warmup_ratio} "
                          "both set the warmup: keep one (the other 0)")
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
    if t.order == "shards" and t.teacher_mode != "offline":
        raise ConfigError(f"train.order=shards deals a teacher store's shards to the ranks, but train.teacher_mode="
                          f"{t.teacher_mode} reads the data, not a store: use train.order=global, or teacher_mode=offline")
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
    for name in (n.strip().upper() for n in t.exit_signals if n.strip()):
        if not isinstance(getattr(signal, name if name.startswith("SIG") else "SIG" + name, None), signal.Signals):
            raise ConfigError(f"train.exit_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    targets = list(cfg.train.report_to)
    for t in targets:
        if t not in REPORT_TO:
            raise ConfigError(f"train.report_to: {t!r} is not one of {list(REPORT_TO)}")
    import importlib.util
    for t in targets:  # a logger that is not installed: one line now, not a traceback after the model loaded
        package = LOGGER_PACKAGES.get(t)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to={t} needs the {package} package, which is not installed: "
                              f"pip install {package} (the extra selfaug[{t}]: pip install \".[{t}]\" in a selfaug "
                              f"checkout), or drop {t} from train.report_to")


def check_paths(cfg: Config, data: bool = True) -> None:
    """The files the recipe names (DeepSpeed configs, and with `data` local data files) exist: checked before any
    model loads."""
    for section, (_, keys) in section_fields().items():
        for key, (_, f) in keys.items():
            value = getattr(getattr(cfg, section), key)
            if f.metadata.get("path") and value is not None and not os.path.isfile(shipped.resolve(value)):
                raise ConfigError(f"{section}.{key}: file {value!r} not found (paths are relative to "
                                  f"{os.getcwd()}, then the shipped ds_configs/ and recipes/); point it at an "
                                  "existing file, e.g. ds_configs/zero2.json")
    for key in ("train", "eval") if data else ():  # a local data file (another name is a Hugging Face dataset's)
        value = getattr(cfg.data, key)
        if value and value.endswith((".jsonl", ".json", ".parquet")) and not os.path.isfile(value):
            raise ConfigError(f"data.{key}: file {value!r} not found (relative to {os.getcwd()}): point it at an "
                              "existing .jsonl or .parquet file, or name a Hugging Face dataset")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently: a
    recipe with two `train:` sections ran with the first one's keys dropped)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key {key!r} is given twice, on lines {seen[key]} and {line}: keep one (merge the "
                                  "two into one section)")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(stream) -> Any:
    """A recipe's YAML (a key given twice in one mapping is a ConfigError naming it and both lines)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def load_config(path: str, overrides: list[str] = (), saved: bool = False) -> Config:
    """A recipe file (under the current directory, else a shipped one: `recipes/tiny.yaml` works anywhere);
    `saved`: a config saved beside a store or run by an earlier version (renamed keys read as the new ones)."""
    path = shipped.resolve(path)
    if os.path.isdir(path):
        raise ConfigError(f"recipe {path!r} is a directory; pass a YAML file, e.g. recipes/tiny.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"recipe {path!r} not found (`selfaug recipes` lists the shipped ones)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    try:
        return build_config(raw, overrides, saved)
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None


def _allowed(hint, f) -> str:
    """A field's choices or range in words ("" when any value of its type is allowed)."""
    base, _ = _strip_optional(hint)
    if get_origin(base) is Literal:
        return " | ".join(get_args(base))
    return ", ".join(f"{w} {f.metadata[k]:g}" for k, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                     if f.metadata.get(k) is not None)


def describe(cfg: Config) -> str:
    """The resolved recipe as YAML, each key followed by its help (and allowed values or range)."""
    lines = []
    for section, (_, keys) in section_fields().items():
        lines.append(f"{section}:")
        obj = getattr(cfg, section)
        for key, (hint, f) in keys.items():
            value = json.dumps(getattr(obj, key))  # a JSON scalar is a YAML scalar
            allowed = _allowed(hint, f)
            note = f.metadata.get("help", "") + (f" [{allowed}]" if allowed else "")
            lines.append(f"  {key}: {value:<24} # {note}")
    return "\n".join(lines)


def reference() -> str:
    """Every key of every section as Markdown tables (docs/configuration.md is this, generated)."""
    out = []
    for section, (_, keys) in section_fields().items():
        out += [f"## `{section}`", "", "| key | default | allowed | what it does |", "|---|---|---|---|"]
        for key, (hint, f) in keys.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "required" if default == REQUIRED else f"`{json.dumps(default)}`"
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            out.append(f"| `{key}` | {shown} | {_allowed(hint, f).replace('|', 'or')} | {help_text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def config_digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
