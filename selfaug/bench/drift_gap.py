"""`selfaug bench --only drift --config EVAL_RECIPE` (docs/design.md, "Benchmarks"): what `eval.drift_k` costs in
accuracy. Eval's drift is the bucket KL against the base's top-k stored on the drift texts (`eval/drift.py`): exact
at k = |V| and never above the exact KL below it. On an evaluation that has run (its base's responses kept under
`<eval.output_dir>/models/base.json`), the drift stores at the recipe's k and at k = |V| are built with eval's own
code in a scratch directory, and every model of `eval.runs` is compared against both: the gap per model, as a
share of the exact KL, and whether the bucket KL ever exceeds it. One model in memory at a time, as in eval.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from ..config import Config, build_config
from ..data import encode_prompt
from ..eval import drift as drifts
from ..eval import ifeval
from ..eval.evaluate import _release, load_run_model
from ..models import config_of, load_model, load_tokenizer_for, resolve_dtype


def _texts(cfg: Config, tok) -> list[drifts.DriftText]:
    """The drift texts of the evaluation at cfg.eval.output_dir, as `selfaug eval` built them."""
    path = os.path.join(cfg.eval.output_dir, "models", "base.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `selfaug eval` with this recipe first (the drift texts are "
                                f"the base model's responses, kept there)")
    with open(path) as f:
        responses = json.load(f)["scores"]["drift_responses"]
    rows = ifeval.load_prompts(cfg.eval.ifeval_path, cfg.eval.max_ifeval_prompts)
    prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    n = min(cfg.eval.max_drift_prompts, len(rows), len(responses))
    return [drifts.DriftText(i, p + tok(r, add_special_tokens=False)["input_ids"], len(p))
            for i, (p, r) in enumerate(zip(prompts[:n], responses[:n]))]


def bench_drift_k(cfg: Config) -> dict:
    import torch
    device = torch.device("cpu")
    dtype = resolve_dtype(cfg.model.dtype, device)
    tok = load_tokenizer_for(cfg.model)
    texts = _texts(cfg, tok)
    vocab = config_of(cfg.model).vocab_size
    scratch = tempfile.mkdtemp(prefix="selfaug-bench-drift-")
    try:
        stores, base = {}, load_model(cfg.model, dtype, device=device).eval()
        for k in (min(cfg.eval.drift_k, vocab), vocab):
            kcfg = build_config(cfg.to_dict(), [f"eval.output_dir={os.path.join(scratch, str(k))}",
                                                f"eval.drift_k={k}"])
            t0 = time.time()
            stores[k] = drifts.base_store(kcfg, base, tok, texts, dtype, device)
            print(f"  drift store at k = {k}: {time.time() - t0:.1f} s, "
                  f"{int(stores[k].lengths().kl.sum()):,} positions", flush=True)
        base = None
        _release()
        rows = []
        for run_dir in cfg.eval.runs:
            model, _ = load_run_model(cfg, run_dir, dtype, device)
            got = {k: drifts.drift(model, s)[0] for k, s in stores.items()}
            model = None
            _release()
            at_k, exact = got[min(cfg.eval.drift_k, vocab)], got[vocab]
            rows.append({"run": os.path.basename(os.path.normpath(run_dir)), "drift_at_k": at_k, "exact": exact,
                         "gap": exact - at_k, "gap_share": (exact - at_k) / exact if exact else 0.0})
            print(f"  {rows[-1]['run']}: drift {at_k:.5f} at k = {cfg.eval.drift_k}, {exact:.5f} exact: "
                  f"{100 * rows[-1]['gap_share']:.2f} % below", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shares = [r["gap_share"] for r in rows]
    return {"k": min(cfg.eval.drift_k, vocab), "vocab": vocab, "texts": len(texts), "rows": rows,
            "max_gap_share": max(shares, default=0.0), "mean_gap_share": sum(shares) / max(len(shares), 1),
            "never_above_exact": all(r["drift_at_k"] <= r["exact"] + 1e-9 for r in rows)}
