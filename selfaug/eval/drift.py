"""Distribution drift (docs/design.md, "Stage 3"): how far a fine-tuned model has moved from the base, as the
mean per-token KL(base ‖ model) over the drift texts (IFEval prompts followed by the base model's own
responses), at every position.

The base's side is computed once, while the base is the model in memory, with stage 1's code (`precompute.Teacher`,
positions `all`, the top `eval.drift_k` log-probs and the tail mass) into a teacher store cached with the eval
outputs (`<eval.output_dir>/drift_teacher/`, reused while the base, the texts and k are the same). Each tuned model
is then compared against the store alone, so evaluation holds one model at a time. The stored KL is the bucket
KL (`loss.kl_from_topk`): equal to the exact KL at k = |V| and never above it; at the default k the gap is measured
in docs/results.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import NamedTuple

import torch

from .. import store
from ..config import Config, build_config
from ..loss import kl_sum
from ..models import config_of, decoder_and_head, head_scale


class DriftText(NamedTuple):
    """One drift sequence as stage 1 reads an example: the prompt ++ the base's response."""
    example_id: int
    input_ids: list
    prompt_len: int


def _store_cfg(cfg: Config, k: int) -> Config:
    """The recipe stage 1 runs for the drift store: every position, top-k values in fp32, one shard per 64 texts."""
    where = os.path.join(cfg.eval.output_dir, "drift_teacher")
    return build_config(cfg.to_dict(), [
        f"teacher.output_dir={where}", "teacher.signal=topk", f"teacher.k={k}", "teacher.positions=all",
        "teacher.position_fraction=1", "teacher.max_positions=null", "teacher.value_dtype=float32",
        "teacher.compression=none", "teacher.shard_size=64", "teacher.deepspeed=null", "teacher.overwrite=true"])


def _planned(cfg: Config, tok, texts: list[DriftText], dtype) -> tuple[Config, dict]:
    """The drift store's recipe and the settings it must have (the base, the texts, k)."""
    vocab = config_of(cfg.model).vocab_size
    scfg = _store_cfg(cfg, min(cfg.eval.drift_k, vocab))
    digest = hashlib.sha256(json.dumps([[t.input_ids, t.prompt_len] for t in texts]).encode()).hexdigest()
    data_fp = {"source": "eval:drift texts (IFEval prompts + the base model's responses)", "sha256": digest,
               "records": len(texts), "max_examples": None}
    return scfg, store.store_settings(scfg, tok, vocab, dtype, data_fp)


def cached_store(cfg: Config, tok, texts: list[DriftText], dtype) -> store.TeacherStore | None:
    """The drift store of an earlier evaluation when it is complete and has these settings, else None."""
    scfg, settings = _planned(cfg, tok, texts, dtype)
    try:
        manifest = store.read_manifest(scfg.teacher.output_dir)
    except store.StoreError:
        return None
    if manifest.get("status") != "complete" or store.settings_diff(settings, manifest["settings"]):
        return None
    return store.TeacherStore(scfg.teacher.output_dir)


def base_store(cfg: Config, base, tok, texts: list[DriftText], dtype, device) -> store.TeacherStore:
    """The base's signal at every position of the texts, computed with stage 1's code into a teacher store."""
    from ..precompute import Teacher
    scfg, settings = _planned(cfg, tok, texts, dtype)
    teacher = Teacher(base, scfg, tok.pad_token_id, device, partitioned=False)
    size = scfg.teacher.shard_size
    t0 = time.time()
    how = {"teacher": "whole", "world_size": 1, "deepspeed": None, "for": "selfaug eval drift"}
    with store.StoreWriter(scfg.teacher.output_dir, settings, how, overwrite=True, config=scfg.to_dict()) as writer:
        for j in writer.open((len(texts) + size - 1) // size)[0]:
            chunk = texts[j * size:(j + 1) * size]
            writer.write(j, teacher.compute_shard(chunk), j * size, len(chunk),
                         {"policy": "skip", "max_seq_len": scfg.data.max_seq_len})
        writer.close(time.time() - t0)
    return store.TeacherStore(scfg.teacher.output_dir)


@torch.no_grad()
def drift(model, teacher_store: store.TeacherStore, chunk_rows: int = 512) -> tuple[float, list]:
    """Mean per-token KL(base ‖ model) over every stored position of the drift texts, and each text's
    [KL sum, positions] (the items a study resamples)."""
    body, head = decoder_and_head(model)
    scale = head_scale(model)  # logits = scale * lm_head(hidden)
    device = head.weight.device
    total, count, per = 0.0, 0, []
    for i in range(len(teacher_store)):
        row = teacher_store.example(i)
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long, device=next(model.parameters()).device)[None]
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state.to(device) * scale  # (1, T, H)
        rows_t = torch.as_tensor(row["positions"], dtype=torch.long, device=device)
        teacher = teacher_store.signal.teacher([row]).to_device(device)
        s, n = kl_sum(hidden, head.weight, head.bias, torch.zeros_like(rows_t), rows_t, teacher, chunk_rows=chunk_rows)
        total, count = total + s.item(), count + n
        per.append([s.item(), n])
    return total / max(count, 1), per
