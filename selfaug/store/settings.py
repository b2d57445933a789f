"""What a store depends on (docs/design.md, "The teacher store"): `store_settings`, the keys that must
match for training (`MATCHED`), and the one comparison of settings (`settings_diff`, `check_store`).
"""
from __future__ import annotations

from .format import PositionRule, StoreError, id_dtype_for
from .signals import signal_for


def store_settings(cfg, tok, vocab_size: int, dtype, data_fp: dict, model_fp: dict | None = None) -> dict:
    """Everything a store depends on; a store is reused or resumed only if this matches exactly. `model_fp`: the
    model's fingerprint where it is not the recipe's `model` (a model in memory), else `model_fingerprint`'s."""
    from ..data import record_settings, tokenizer_fingerprint
    from ..models import model_fingerprint
    teacher_cfg = cfg.teacher
    signal = signal_for(teacher_cfg, vocab_size)
    records = record_settings(cfg.data)
    return {
        "model": {**(model_fp or model_fingerprint(cfg.model)), "dtype": str(dtype).replace("torch.", ""),
                  "vocab_size": vocab_size},
        "tokenizer": tokenizer_fingerprint(tok),
        "data": data_fp,
        **signal.settings(),
        "positions": teacher_cfg.positions,
        "position_fraction": teacher_cfg.position_fraction,
        "max_positions": teacher_cfg.max_positions,
        "seed": teacher_cfg.seed if signal.draws or PositionRule.of(teacher_cfg).sampled else None,
        "value_dtype": teacher_cfg.value_dtype,
        "id_dtype": id_dtype_for(vocab_size),
        "compression": teacher_cfg.compression,
        "shard_size": teacher_cfg.shard_size,
        "max_seq_len": cfg.data.max_seq_len,
        "long_policy": cfg.data.long_policy,
        "system_prompt": cfg.data.system_prompt,
        **({"records": records} if records else {}),
    }


# the settings that must match the recipe for the stored teacher to be the right one for training
# (a store's compression or shard size, say, does not change what it holds)
MATCHED = ("model.name_or_path", "model.content_hash", "model.vocab_size", "tokenizer.vocab_sha256",
           "tokenizer.chat_template_sha256", "data.source", "data.sha256", "data.records", "signal", "k", "samples",
           "positions", "position_fraction", "max_positions", "seed", "max_seq_len", "long_policy", "system_prompt",
           "records.format", "records.fields", "records.unanswerable")


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_diff(expected: dict, found: dict, keys=None) -> list[str]:
    """The one comparison of store settings: 'key (store: x, recipe: y)' for each differing dotted key
    (all of them, or those in `keys`)."""
    a, b = _leaves(expected), _leaves(found)
    names = keys if keys is not None else sorted(set(a) | set(b))
    return [f"{k} (store: {b.get(k)!r}, recipe: {a.get(k)!r})" for k in names if a.get(k) != b.get(k)]


def check_store(store_dir: str, manifest: dict, expected: dict) -> None:
    """Refuse a store made for another model, tokenizer, data, signal or k, naming each differing field."""
    found = manifest["settings"].get("signal")
    if found != expected["signal"]:
        raise StoreError(f"teacher store {store_dir} holds teacher.signal={found} values, the recipe has "
                         f"teacher.signal={expected['signal']}: set teacher.signal={found}, or precompute a "
                         f"{expected['signal']} store into another teacher.output_dir")
    files = {f"model.files.{n}" for n in {**expected["model"].get("files", {}),  # which weight file changed
                                          **manifest["settings"]["model"].get("files", {})}}
    diff = settings_diff(expected, manifest["settings"], MATCHED + tuple(sorted(files)))
    if diff:
        raise StoreError(f"teacher store {store_dir} does not match this recipe: " + "; ".join(diff)
                         + ". Re-run `selfaug precompute` with this recipe, or point teacher.output_dir "
                           "at the store made for it.")
