"""IFEval scoring with the instruction checkers of the `lm-eval` package, offline (docs/design.md, "Stage 3").

lm-eval's checkers ask NLTK for the `punkt_tab` data (downloaded at import, and used to count
sentences and split words); nothing can be downloaded here, so before import the download is made a
no-op, and the two uses get splitters that need no data: IFEval's own regex sentence splitter
(`split_into_sentences`, in the same module) and a regex word tokenizer.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import types

DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "ifeval_dev.jsonl")
_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


def _checkers():
    import nltk
    download = nltk.download
    nltk.download = lambda *a, **k: False  # lm-eval calls it at import when punkt_tab is missing
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Downloaded punkt_tab" regardless
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    instructions_util.count_sentences = lambda text: len(instructions_util.split_into_sentences(text))
    instructions_util.nltk = types.SimpleNamespace(tokenize=nltk.tokenize, data=nltk.data,
                                                   word_tokenize=lambda text, *a, **k: _WORD.findall(text))
    return utils


def load_prompts(path: str | None = None, limit: int | None = None) -> list[dict]:
    path = path or DEFAULT_PROMPTS
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                missing = {"prompt", "instruction_id_list", "kwargs"} - set(row)
                if missing:
                    raise ValueError(f"{path}:{lineno}: IFEval record without {sorted(missing)}")
                rows.append(row)
    return rows[:limit] if limit else rows


def score(prompts: list[dict], responses: list[str]) -> dict:
    """Strict and loose accuracy, at prompt level and instruction level, and per-prompt results."""
    utils = _checkers()
    out = {"n_prompts": len(prompts)}
    per_prompt = []
    for mode, fn in (("strict", utils.test_instruction_following_strict),
                     ("loose", utils.test_instruction_following_loose)):
        followed_all, followed = [], []
        for i, (row, response) in enumerate(zip(prompts, responses)):
            inp = utils.InputExample(key=row.get("key", i), instruction_id_list=row["instruction_id_list"],
                                     prompt=row["prompt"], kwargs=row["kwargs"])
            res = fn(inp, response)
            followed_all.append(res.follow_all_instructions)
            followed += res.follow_instruction_list
            if mode == "strict":
                per_prompt.append({"key": inp.key, "strict": res.follow_instruction_list})
            else:
                per_prompt[i]["loose"] = res.follow_instruction_list
        out[f"{mode}_prompt_acc"] = sum(followed_all) / max(len(followed_all), 1)
        out[f"{mode}_instruction_acc"] = sum(followed) / max(len(followed), 1)
    out["per_prompt"] = per_prompt
    return out
