"""Examples (docs/design.md, "Data"): records rendered with the model's chat template into
(input_ids, prompt_len) examples by `datasets.map(num_proc=data.num_proc)`, validated and counted.

Examples longer than `data.max_seq_len` follow `data.long_policy` (skip | truncate | error) and are
counted. Every record is validated before any model runs; an error names the source, the record's
index (and the line of a JSONL file). The tokenized set is written once, by rank 0, to a cache file
keyed by the data, the tokenizer and the data settings ($SELFAUG_DATA_CACHE, default
$SELFAUG_CACHE/tokenized); the other ranks wait and read the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .. import dist
from . import formats
from .formats import DataError
from .records import TOKENIZE_VERSION, convert, load_records, record_settings

OK, TRUNCATED, SKIPPED, UNANSWERED = 0, 1, 2, 3  # the `status` column of a tokenized set


def cache_dir() -> str:
    return os.environ.get("SELFAUG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfaug"))


@dataclass
class Example:
    example_id: int  # index of the record in the source
    input_ids: list[int]  # prompt ++ response
    prompt_len: int


COUNTED = ("skipped", "truncated", "unanswered")  # what a tokenized set leaves out or cuts, counted


def record_numbers(ids: list[int], shown: int = 10) -> str:
    """"records 3, 8, 12 ...": the first `shown` record numbers of a counted kind."""
    return f"records {', '.join(map(str, ids[:shown]))}{' ...' if len(ids) > shown else ''}"


@dataclass
class LongStats:
    policy: str
    max_seq_len: int
    skipped: list[int] = field(default_factory=list)  # example ids
    truncated: list[int] = field(default_factory=list)
    unanswered: list[int] = field(default_factory=list)  # records without an answer (data.unanswerable=skip)

    def to_dict(self) -> dict:
        out = {"policy": self.policy, "max_seq_len": self.max_seq_len}
        for key in COUNTED:
            ids = getattr(self, key)
            out.update({key: len(ids), f"{key}_ids": ids[:1000]})
        return out

# ---- rendering --------------------------------------------------------------------------------

def encode_prompt(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_chat(tok, messages: list[dict], where: str) -> tuple[list[int], int]:
    """(input_ids, prompt_len): the prompt is checked to be a token prefix of the whole."""
    try:
        full_text = tok.apply_chat_template(messages, tokenize=False)
        full_text.encode("utf-8")  # the one check of valid Unicode: tokenizers fail on it each their own way
        prompt = encode_prompt(tok, messages[:-1])
        full = tok(full_text, add_special_tokens=False)["input_ids"]
    except UnicodeError as e:  # a lone surrogate (a JSON "\\ud800" escape) is no text a tokenizer can encode
        raise DataError(f"{where}: text that cannot be encoded (invalid Unicode: {e.reason}, "
                        f"{e.object[e.start:e.end]!r}); fix or drop the record") from None
    except Exception as e:  # the chat template or the tokenizer refused the record's content
        raise DataError(f"{where}: the chat template or tokenizer refused the record "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if full[: len(prompt)] != prompt:
        raise DataError(f"{where}: the chat template's prompt is not a token prefix of the full conversation; "
                        "the prompt/response boundary cannot be found")
    if len(full) == len(prompt):
        raise DataError(f"{where}: empty response after tokenization")
    return full, len(prompt)


def encode_record(row: dict, index: int, tok, cfg, source: str) -> tuple[list[int], int, int]:
    """(input_ids, prompt_len, status) of one source row under data.unanswerable and data.long_policy."""
    where = f"{source}: record {index}"
    record = convert(row, source, index, cfg)
    if record is None:
        return [], 0, UNANSWERED
    ids, plen = encode_chat(tok, formats.to_messages(record, cfg.system_prompt), where)
    if len(ids) <= cfg.max_seq_len:
        return ids, plen, OK
    if cfg.long_policy == "error":
        raise DataError(f"{where}: {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len} "
                        "(raise max_seq_len, or set data.long_policy=skip or truncate)")
    if cfg.long_policy == "truncate" and plen < cfg.max_seq_len:
        return ids[: cfg.max_seq_len], plen, TRUNCATED  # cut the end of the response; the prompt stays whole
    return [], plen, SKIPPED


def _tokenize_batch(batch: dict, indices: list[int], tok, cfg, source: str) -> dict:
    """datasets.map function: never raises, so that every record's problem is found in one pass."""
    out = {"example_id": [], "input_ids": [], "prompt_len": [], "status": [], "error": []}
    names = list(batch)
    for j, i in enumerate(indices):
        ids, plen, status, error = [], 0, SKIPPED, None
        try:
            ids, plen, status = encode_record({k: batch[k][j] for k in names}, i, tok, cfg, source)
        except DataError as e:
            error = str(e)
        out["example_id"].append(i), out["input_ids"].append(ids), out["prompt_len"].append(plen)
        out["status"].append(status), out["error"].append(error)
    return out


# ---- the tokenized set ------------------------------------------------------------------------

class Examples:
    """The tokenized, validated examples of a source (memory-mapped Arrow): rows in source order,
    skipped records kept as rows with status SKIPPED so that chunk j of stage 1 is always records
    [j * shard_size, (j + 1) * shard_size)."""

    def __init__(self, ds, fingerprint: dict, policy: str, max_seq_len: int):
        self.ds, self.fingerprint = ds.with_format("numpy"), fingerprint
        self.policy, self.max_seq_len = policy, max_seq_len
        table = ds.data.table
        self._status = table.column("status").to_numpy()
        import pyarrow.compute as pc
        self._lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)

    def __len__(self) -> int:  # records, skipped ones included
        return len(self._status)

    def longest(self) -> int:
        """Tokens of the longest kept example (0 if none is kept)."""
        kept = self._lengths[np.isin(self._status, (OK, TRUNCATED))]
        return int(kept.max()) if len(kept) else 0

    def kept_lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record index, tokens, prompt tokens) of every kept example, without reading the tokens."""
        kept = np.flatnonzero(np.isin(self._status, (OK, TRUNCATED)))
        prompt = self.ds.data.table.column("prompt_len").to_numpy()
        return kept, self._lengths[kept].astype(np.int64), np.asarray(prompt)[kept].astype(np.int64)

    def left_out(self) -> str:
        """One line on the records left out or cut (empty if none), with the first numbers of each kind."""
        parts = []
        for status, words in ((SKIPPED, f"skipped as longer than data.max_seq_len={self.max_seq_len}"),
                              (TRUNCATED, "truncated to data.max_seq_len"),
                              (UNANSWERED, "without an answer skipped (data.unanswerable=skip)")):
            ids = np.flatnonzero(self._status == status).tolist()
            if ids:
                parts.append(f"{len(ids)} {words} ({record_numbers(ids)})")
        return f"{len(self)} records; " + "; ".join(parts) if parts else ""

    def examples(self, lo: int = 0, hi: int | None = None) -> tuple[list[Example], LongStats]:
        """The kept examples of records [lo, hi) and the long-example counts of that range."""
        hi = len(self) if hi is None else hi
        rows = self.ds[lo:hi]
        stats = LongStats(self.policy, self.max_seq_len)
        out = []
        for j, status in enumerate(self._status[lo:hi]):
            i = lo + j
            if status in (SKIPPED, UNANSWERED):
                (stats.skipped if status == SKIPPED else stats.unanswered).append(i)
                continue
            if status == TRUNCATED:
                stats.truncated.append(i)
            out.append(Example(i, rows["input_ids"][j].astype(np.int64).tolist(), int(rows["prompt_len"][j])))
        return out, stats


def tokenizer_fingerprint(tok) -> dict:
    vocab = tok.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()
    t = hashlib.sha256((tok.chat_template or "").encode()).hexdigest()
    return {"vocab_sha256": h, "chat_template_sha256": t, "vocab_size": len(vocab)}


def tokenized_cache_key(fp: dict, tok, cfg) -> str:
    key = {"data": fp, "tokenizer": tokenizer_fingerprint(tok), "max_seq_len": cfg.max_seq_len,
           "long_policy": cfg.long_policy, "system_prompt": cfg.system_prompt, "version": TOKENIZE_VERSION,
           **record_settings(cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def load_examples(source: str, tok, cfg) -> Examples:
    """Read, validate and tokenize a source (`cfg` is the DataConfig). Rank 0 tokenizes into the cache
    while the other ranks wait, then read the same file; a bad record raises DataError on every rank
    before any model work, naming the record (and how many others are bad)."""
    import pyarrow.compute as pc
    rank = int(os.environ.get("RANK", 0))
    made = {}
    # rank 0 writes the Arrow caches first, the others then read them; a failure on any rank (a path one node
    # cannot read) is raised on every rank at once, none is left waiting for train.ddp_timeout
    dist.decide(lambda: made.update(out=_tokenized(source, tok, cfg)))
    out, fp = dist.together(lambda: made.get("out") or _tokenized(source, tok, cfg))
    errors = out.data.table.column("error")
    bad = pc.is_valid(errors)
    n_bad = pc.sum(bad).as_py() or 0
    if n_bad:
        first = errors[pc.index(bad, True).as_py()].as_py()
        more = f" ({n_bad - 1} more records have errors)" if n_bad > 1 else ""
        raise DataError(first + more)
    examples = Examples(out, fp, cfg.long_policy, cfg.max_seq_len)
    if rank == 0:
        line = examples.left_out()
        if line:
            print(f"data {source}: {line}", flush=True)
    return examples


def _tokenized(source: str, tok, cfg):
    """(the tokenized set, the data's fingerprint): read from the cache, or tokenized into it."""
    ds, fp = load_records(source, cfg)
    key = tokenized_cache_key(fp, tok, cfg)
    root = os.environ.get("SELFAUG_DATA_CACHE", os.path.join(cache_dir(), "tokenized"))
    path = os.path.join(root, f"{key}.arrow")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kwargs = dict(batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                  fn_kwargs={"tok": tok, "cfg": cfg, "source": source}, cache_file_name=path,
                  new_fingerprint=key, load_from_cache_file=True, desc="tokenize",
                  num_proc=cfg.num_proc if cfg.num_proc > 1 and len(ds) >= 2 * cfg.num_proc else None)
    return ds.map(_tokenize_batch, **kwargs), fp


def pad(seqs: list, pad_id: int, left: bool = False):
    """(input_ids, attention_mask) as (B, T) int64 tensors, padded to the longest sequence on the
    right (training, stage 1) or on the left (generation)."""
    import torch
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[b, span] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[b, span] = 1
    return ids, mask
