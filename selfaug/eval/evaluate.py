"""Stage 3 (docs/design.md, "Stage 3"): the base model against fine-tuned runs: RAG task accuracy (plain, and
strict: an answer that also names another document's answer is wrong), IFEval instruction following,
and distribution drift (mean per-token KL(base || fine-tuned) on held-out general prompts, `drift.py`).

One model is in memory at a time: the base is evaluated first and leaves its signal on the drift texts in a
teacher store; each run is then loaded, evaluated, compared against that store, and freed. Each model's scores
are kept under `<eval.output_dir>/models/` as soon as it is done, so an interrupted evaluation resumes with the
models not yet scored. Writes report.json and PNG plots, and prints a table.
"""
from __future__ import annotations

import json
import os
import re
import string
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

from .. import dist, locks
from . import ifeval
from ..config import Config, ConfigError, config_digest, load_config
from ..data import BUILTIN_RAG, BUILTIN_RAG_EVAL, encode_prompt, pad, read_records, record_numbers
from ..data.formats import to_messages
from ..durable import write_atomic
from ..models import check_head, load_model, load_tokenizer_for, model_fingerprint, resolve_dtype
from . import drift as drifts


def normalize(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(text.split())


def answer_found(generated: str, gold: str) -> bool:
    """The gold answer, normalized, appears as whole words in the normalized generated text."""
    g, t = normalize(gold), normalize(generated)
    return bool(g) and re.search(rf"(^| ){re.escape(g)}( |$)", t) is not None


def rivals(records: list[dict]) -> list[list[str]]:
    """Per record, the other documents' answers that the strict metric refuses: the record's own
    `distractors` when the data knows them (the built-in set does), else every other record's answer
    that appears in one of this record's documents. Either way without those that equal, contain or
    are contained in the gold answer (naming the gold would name them too)."""
    answers = [r.get("answer") for r in records]
    normed = [normalize(a) if a else "" for a in answers]
    out = []
    for i, r in enumerate(records):
        if "distractors" in r:
            found = r["distractors"]
        else:
            docs = [normalize(d) for d in r.get("documents", [])]
            found = [a for j, (a, n) in enumerate(zip(answers, normed)) if j != i and n
                     and any(n in d and answer_found(d, a) for d in docs)]
        gold = r.get("answer") or ""
        out.append(sorted({c for c in found if c and not answer_found(c, gold) and not answer_found(gold, c)}))
    return out


def strict_correct(generated: str, golds: list[str], others: list[str]) -> bool:
    """Right under the strict metric: a gold answer (or an alias) appears and no other document's answer does."""
    return any(answer_found(generated, g) for g in golds) and not any(answer_found(generated, o) for o in others)


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """Greedy, batched (left padding), longest prompts first; texts back in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        ids, mask = pad([prompts[i] for i in idx], tok.pad_token_id, left=True)
        T = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        for b, i in enumerate(idx):
            out[i] = tok.decode(gen[b, T:], skip_special_tokens=True)
    return out


def _selfaug_form(run_dir: str) -> str | None:
    """Where an entry of eval.runs holds selfaug's Hugging Face form (with its `selfaug_config.yaml`): a run's
    final/, or a checkpoint's hf/ (`RUN/checkpoints/step-N`, train.save_hf); None for any other directory."""
    for sub in ("final", "hf"):
        if os.path.isfile(os.path.join(run_dir, sub, "selfaug_config.yaml")):
            return os.path.join(run_dir, sub)
    return None


def _run_source(run_dir: str) -> None:
    """An entry of eval.runs that can be loaded: a selfaug run with its final/, a checkpoint with its hf/, or a
    model or adapter directory."""
    if os.path.isfile(os.path.join(run_dir, "selfaug.json")) and _selfaug_form(run_dir) is None:
        raise ConfigError(f"eval.runs: {run_dir} is a checkpoint without its Hugging Face form (hf/): train with "
                          "train.save_hf=true to write it with every checkpoint, or evaluate the run's final/")
    if not (_selfaug_form(run_dir)
            or any(os.path.isfile(os.path.join(run_dir, f)) for f in ("adapter_config.json", "config.json"))):
        raise ConfigError(f"eval.runs: {run_dir} is neither a selfaug run with a final/ model nor a Hugging Face model "
                          "or peft adapter directory (config.json or adapter_config.json)")


def load_run_model(cfg: Config, run_dir: str, dtype, device):
    """(model, alpha) of one entry of eval.runs: a `selfaug train` run (its final/), one of its checkpoints (its
    hf/), or any Hugging Face model directory or peft adapter directory (`SelfAugTrainer.save_model`, another
    trainer's output). An adapter goes on its own base model when that is a directory or hub id, else on the
    recipe's model."""
    _run_source(run_dir)
    form, alpha = _selfaug_form(run_dir), None
    if form is not None:
        saved = load_config(os.path.join(form, "selfaug_config.yaml"), saved=True)
        alpha, base_cfg, where = saved.train.alpha, saved.model, form
    else:  # a model or adapter directory (`_run_source`)
        base_cfg, where = cfg.model, run_dir
        trainer_json = os.path.join(run_dir, "selfaug_trainer.json")
        if os.path.isfile(trainer_json):
            with open(trainer_json) as f:
                alpha = json.load(f).get("alpha")
    device_map = cfg.eval.device_map
    if os.path.exists(os.path.join(where, "adapter_config.json")):
        from peft import PeftModel
        base = load_model(base_cfg, dtype, device_map=device_map, device=device)
        # unmerged: peft merges in place in the weight's dtype, and in bf16 every element of the update under half an
        # ulp of its weight rounds back to the base (most of a small LoRA update); the adapter's own fp32 matrices keep
        # it whole (what a bf16 forward then resolves of it: docs/method.md, "Precision")
        return _head_checked(PeftModel.from_pretrained(base, where).eval()), alpha
    from transformers import AutoModelForCausalLM
    return _head_checked(AutoModelForCausalLM.from_pretrained(where, dtype=dtype,
                                                              device_map=device_map or {"": device}).eval()), alpha


def _head_checked(model):
    """The model, once its logits are head_scale * lm_head(h), which drift computes (`models.check_head`)."""
    check_head(model)
    return model


def _drift_budget(run_dir: str) -> float | None:
    """The run's train.drift_budget (a `selfaug train` run; None otherwise)."""
    form = _selfaug_form(run_dir)
    return load_config(os.path.join(form, "selfaug_config.yaml"), saved=True).train.drift_budget if form else None


class RagSet(NamedTuple):
    prompts: list  # token ids
    golds: list  # per prompt: the gold answer and its aliases
    others: list  # per prompt: the answers the strict metric refuses (`rivals`)
    unanswered: list  # record numbers left out by data.unanswerable=skip


def _rag_set(cfg: Config, tok) -> RagSet:
    """The held-out RAG prompts, in any data.format, with what each answer is scored against."""
    source = cfg.data.eval or (BUILTIN_RAG_EVAL if cfg.data.train == BUILTIN_RAG else None)
    if source is None:
        return RagSet([], [], [], [])
    records, unanswered = read_records(source, cfg.data, limit=cfg.eval.max_rag_examples)
    if unanswered:
        print(f"eval: {len(unanswered)} records of {source} without an answer left out (data.unanswerable=skip): "
              f"{record_numbers(unanswered)}", flush=True)
    prompts, golds = [], []
    for r in records:
        msgs = to_messages(r, cfg.data.system_prompt)
        prompts.append(encode_prompt(tok, msgs[:-1]))
        golds.append([r["answer"], *r.get("aliases", [])] if "answer" in r else [msgs[-1]["content"]])
    return RagSet(prompts, golds, rivals(records), unanswered)


def evaluate_model(name, model, tok, ec, rag, if_rows, if_prompts) -> dict:
    t0 = time.time()
    res = {}
    if rag.prompts:
        texts = generate(model, tok, rag.prompts, ec.rag_max_new_tokens, ec.batch_size, f"{name}: RAG")
        hits = [any(answer_found(t, g) for g in golds) for t, golds in zip(texts, rag.golds)]
        strict = [strict_correct(t, golds, others) for t, golds, others in zip(texts, rag.golds, rag.others)]
        res["rag_accuracy"] = sum(hits) / len(hits)
        res["rag_strict_accuracy"] = sum(strict) / len(strict)
        res["rag_examples"], res["rag_unanswered"] = len(hits), len(rag.unanswered)
        res["rag_answer_words"] = sum(len(t.split()) for t in texts) / len(texts)
        res["rag_samples"] = [{"generated": t, "gold": g[0], "others": o, "correct": h, "strict": s}
                              for t, g, o, h, s in list(zip(texts, rag.golds, rag.others, hits, strict))[:8]]
    responses = generate(model, tok, if_prompts, ec.max_new_tokens, ec.batch_size, f"{name}: IFEval")
    scores = ifeval.score(if_rows, responses)
    res["ifeval"] = {k: v for k, v in scores.items() if k != "per_prompt"}
    # every metric per evaluated item, as [numerator, denominator] (the metric is their sums' ratio): what a
    # study resamples for its confidence intervals
    res["items"] = {f"ifeval_{mode}_{level}": [[int(all(p[mode])) if level == "prompt" else sum(p[mode]),
                                                  1 if level == "prompt" else len(p[mode])]
                                                 for p in scores["per_prompt"]]
                    for mode in ("strict", "loose") for level in ("prompt", "instruction")}
    if rag.prompts:
        res["items"].update(rag_accuracy=[[int(h), 1] for h in hits], rag_strict_accuracy=[[int(x), 1] for x in strict])
    # a plain sign of format collapse: fine-tuning on short answers shortens every answer
    res["ifeval"]["mean_response_words"] = sum(len(t.split()) for t in responses) / max(len(responses), 1)
    res["ifeval_samples"] = [{"prompt": r["prompt"], "response": t} for r, t in list(zip(if_rows, responses))[:3]]
    res["eval_time_s"] = time.time() - t0
    return res, responses


class Kept:
    """Each model's scores under `<eval.output_dir>/models/<name>.json`, written as soon as the model is done and
    read back when its key (the evaluation's settings, the model's weights) is the same: an interrupted
    evaluation resumes with the models it has not scored."""

    def __init__(self, out_dir: str, settings: str):
        self.dir, self.settings = os.path.join(out_dir, "models"), settings

    def get(self, name: str, weights: str) -> dict | None:
        path = os.path.join(self.dir, f"{name}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            kept = json.load(f)
        return kept["scores"] if kept.get("key") == [self.settings, weights] else None

    def put(self, name: str, weights: str, scores: dict) -> None:
        path = os.path.join(self.dir, f"{name}.json")  # a name may be a relative path (`model_names`)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps({"key": [self.settings, weights], "scores": scores}))


def model_names(run_dirs: list[str]) -> list[str]:
    """Each run's row name in report.json: its folder's name, or, where two runs share one (`a/selfaug`,
    `b/selfaug`) or one is named `base` (the base model's row), its path relative to the runs' common parent."""
    paths = [os.path.abspath(d) for d in run_dirs]
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names) and "base" not in names:
        return names
    if len(set(paths)) < len(paths):
        twice = next(d for d, p in zip(run_dirs, paths) if paths.count(p) > 1)
        raise ConfigError(f"eval.runs lists {twice} twice: list each run once")
    parent = os.path.commonpath(paths)
    while parent != os.path.dirname(parent) and (parent in paths or "base" in
                                                 [os.path.relpath(p, parent) for p in paths]):
        parent = os.path.dirname(parent)
    return [os.path.relpath(p, parent) for p in paths]


def _weights(cfg: Config, run_dir: str) -> str:
    """What identifies a run's weights: the content of the directory its model loads from (every byte), and for
    an adapter that of the base it goes on (`load_run_model`): a base changed in place is scored again."""
    from ..config import ModelConfig
    form = _selfaug_form(run_dir)
    where = form or run_dir
    weights = model_fingerprint(ModelConfig(name_or_path=where))["content_hash"]
    if not os.path.exists(os.path.join(where, "adapter_config.json")):
        return weights
    base = load_config(os.path.join(form, "selfaug_config.yaml"), saved=True).model if form else cfg.model
    return weights + "+" + model_fingerprint(base)["content_hash"]


def _release() -> None:
    """Memory of the model the caller has just dropped, back before the next one loads."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: Config) -> dict:
    """The evaluation, holding eval.output_dir (one job per directory: a second evaluation there is refused)."""
    lock = locks.DirLock(cfg.eval.output_dir, "eval").acquire()
    try:
        return _evaluate(cfg)
    finally:
        lock.release()


def _evaluate(cfg: Config) -> dict:
    dist.ensure_env()
    device = dist.device()
    ec = cfg.eval
    dtype = resolve_dtype(cfg.model.dtype, device)
    if device.type == "cuda":  # a model larger than one GPU without eval.device_map: one line, not an OOM on cuda:0
        from ..estimate import stage3_problem
        problem = stage3_problem(cfg, dtype.itemsize, torch.cuda.get_device_properties(device).total_memory)
        if problem:
            raise ConfigError(problem)
    tok = load_tokenizer_for(cfg.model)
    tok.padding_side = "left"
    rag = _rag_set(cfg, tok)
    if_rows = ifeval.load_prompts(ec.ifeval_path, ec.max_ifeval_prompts)
    if_prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in if_rows]
    for run_dir in ec.runs:  # a mistyped run is one line now, not after the base model's evaluation
        _run_source(run_dir)
    settings = config_digest({"eval": {k: v for k, v in cfg.to_dict()["eval"].items() if k not in ("output_dir", "runs")},
                              "data": cfg.to_dict()["data"], "dtype": str(dtype), "device": device.type})
    kept = Kept(ec.output_dir, settings)
    base_weights = model_fingerprint(cfg.model)["content_hash"]
    load_base = lambda: _head_checked(load_model(cfg.model, dtype, device_map=ec.device_map, device=device).eval())
    report = {"models": {}, "config": cfg.to_dict(), "runs": {}}
    # the base first, alone in memory: its scores, its responses to the drift prompts, its signal on them (a store)
    base_scores, base = kept.get("base", base_weights), None
    if base_scores is None:
        base = load_base()
        base_scores, responses = evaluate_model("base", base, tok, ec, rag, if_rows, if_prompts)
        base_scores["drift_responses"] = responses[:ec.max_drift_prompts]
    n = min(ec.max_drift_prompts, len(if_rows))
    texts = [drifts.DriftText(i, p + tok(r, add_special_tokens=False)["input_ids"], len(p))
             for i, (p, r) in enumerate(zip(if_prompts[:n], base_scores["drift_responses"][:n]))]
    drift_store = drifts.cached_store(cfg, tok, texts, dtype)
    if drift_store is None:
        base = base if base is not None else load_base()
        drift_store = drifts.base_store(cfg, base, tok, texts, dtype, device)
    if "drift_kl" not in base_scores:
        base_scores["drift_kl"], base_scores["items"]["drift_kl"] = drifts.drift(base, drift_store)
        kept.put("base", base_weights, base_scores)
    base = None  # gone before any run loads
    _release()
    report["models"]["base"] = {k: v for k, v in base_scores.items() if k != "drift_responses"}
    for run_dir, name in zip(ec.runs, model_names(ec.runs)):  # then each run, one at a time
        weights = _weights(cfg, run_dir)
        res = kept.get(name, weights)
        if res is None:
            model, alpha = load_run_model(cfg, run_dir, dtype, device)
            res, _ = evaluate_model(name, model, tok, ec, rag, if_rows, if_prompts)
            res["drift_kl"], res["items"]["drift_kl"] = drifts.drift(model, drift_store)
            res.update(run_dir=run_dir, alpha=alpha, drift_budget=_drift_budget(run_dir))
            model = None
            _release()
            kept.put(name, weights, res)
        else:
            print(f"eval: {name}: scored already ({os.path.join(kept.dir, name + '.json')})", flush=True)
        report["models"][name] = res
        report["runs"][name] = run_dir
    report["sizes"] = {"ifeval_prompts": len(if_rows), "rag_questions": len(rag.prompts), "drift_texts": len(texts),
                       "drift_positions": int(drift_store.lengths().kl.sum()),
                       "drift_k": drift_store.manifest["settings"]["k"]}
    os.makedirs(ec.output_dir, exist_ok=True)
    write_atomic(os.path.join(ec.output_dir, "report.json"), json.dumps(report, indent=2))
    cfg.save(os.path.join(ec.output_dir, "eval_config.yaml"))
    from .plots import plot_report
    plot_report(report, ec.output_dir)
    print(format_table(report), flush=True)
    return report


def format_table(report: dict) -> str:
    lines = [f"{'model':<18}{'RAG acc':>9}{'RAG strict':>11}{'IFEval strict (prompt)':>24}{'IFEval loose (prompt)':>23}"
             f"{'IFEval strict (instr)':>23}{'words':>7}{'drift KL':>10}"]
    for name, r in report["models"].items():
        rag = f"{r['rag_accuracy']:.3f}" if "rag_accuracy" in r else "-"
        strict = f"{r['rag_strict_accuracy']:.3f}" if "rag_strict_accuracy" in r else "-"
        i = r["ifeval"]
        lines.append(f"{name:<18}{rag:>9}{strict:>11}{i['strict_prompt_acc']:>24.3f}{i['loose_prompt_acc']:>23.3f}"
                     f"{i['strict_instruction_acc']:>23.3f}{i['mean_response_words']:>7.0f}{r['drift_kl']:>10.4f}")
    return "\n".join(lines)
