"""Input data: records from JSONL, Parquet, a Hugging Face dataset or the built-in RAG generator,
rendered with the model's chat template into (input_ids, prompt_len) examples.

Two record forms (DESIGN.md): chat form {"messages": [...]} whose last message is the assistant
response, and RAG form {"question", "documents", "answer"}. Examples longer than
`data.max_seq_len` follow `data.long_policy` (skip | truncate | error) and are counted.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from . import ragdata
from .hashing import sha256_file

BUILTIN_RAG = "builtin:rag"
BUILTIN_RAG_EVAL = "builtin:rag-eval"
RAG_INSTRUCTION = "Answer the question using the documents. Reply in the form 'Answer: <answer>'."


class DataError(ValueError):
    pass


@dataclass
class Example:
    example_id: int  # index of the record in the source
    input_ids: list[int]  # prompt ++ response
    prompt_len: int


@dataclass
class LongStats:
    policy: str
    max_seq_len: int
    skipped: list[int] = field(default_factory=list)  # example ids
    truncated: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "max_seq_len": self.max_seq_len, "skipped": len(self.skipped),
                "truncated": len(self.truncated), "skipped_ids": self.skipped[:1000],
                "truncated_ids": self.truncated[:1000]}


def builtin_records(name: str, cfg) -> list[dict]:
    split = {BUILTIN_RAG: "train", BUILTIN_RAG_EVAL: "eval"}.get(name)
    if split is None:
        raise DataError(f"unknown built-in data set {name!r}; built-ins: {BUILTIN_RAG}, {BUILTIN_RAG_EVAL}")
    size = cfg.builtin_train_size if split == "train" else cfg.builtin_eval_size
    return ragdata.generate(split, size, seed=cfg.builtin_seed, num_documents=cfg.builtin_num_documents)


def read_records(source: str, cfg) -> tuple[list[dict], dict]:
    """(records, fingerprint) of a data source; `cfg` is the DataConfig."""
    if source.startswith("builtin:"):
        records = builtin_records(source, cfg)
        params = {"name": source, "train_size": cfg.builtin_train_size, "eval_size": cfg.builtin_eval_size,
                  "seed": cfg.builtin_seed, "num_documents": cfg.builtin_num_documents}
        fp = {"source": source, "sha256": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()}
    elif source.endswith((".jsonl", ".json")) and os.path.exists(source):
        records = []
        with open(source, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        fp = {"source": os.path.abspath(source), "sha256": sha256_file(source)}
    elif source.endswith(".parquet") and os.path.exists(source):
        import pyarrow.parquet as pq
        records = pq.read_table(source).to_pylist()
        fp = {"source": os.path.abspath(source), "sha256": sha256_file(source)}
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data source {source!r}: not found or not a .jsonl/.parquet file")
    else:
        import datasets
        try:
            ds = datasets.load_dataset(source, split=cfg.split)
        except Exception as e:  # offline, unknown name, ...
            raise DataError(f"could not load Hugging Face dataset {source!r} (split {cfg.split!r}): {e}") from e
        records = ds.to_list()
        fp = {"source": f"hf:{source}:{cfg.split}", "sha256": ds._fingerprint}
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
        fp["max_examples"] = cfg.max_examples
    if not records:
        raise DataError(f"data source {source!r} holds no records")
    fp["records"] = len(records)
    return records, fp


def rag_user_message(record: dict) -> str:
    docs = "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(record["documents"]))
    return f"Documents:\n{docs}\n\nQuestion: {record['question']}\n{RAG_INSTRUCTION}"


def to_messages(record: dict, where: str, system_prompt: str | None = None) -> list[dict]:
    """Chat-form messages of a record; the last is the assistant response."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs a role (system|user|assistant) and a string content")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant response")
        if len(msgs) < 2:
            raise DataError(f"{where}: a chat record needs at least one message before the assistant response")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: empty assistant response")
        return msgs
    if "question" in record or "documents" in record:
        for key, typ in (("question", str), ("documents", list), ("answer", str)):
            if not isinstance(record.get(key), typ):
                raise DataError(f"{where}: RAG record needs {key!r} ({typ.__name__})")
        if not record["answer"].strip():
            raise DataError(f"{where}: empty answer")
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": "user", "content": rag_user_message(record)},
                       {"role": "assistant", "content": format_answer(record["answer"])}]
    raise DataError(f"{where}: record has neither 'messages' (chat form) nor 'question'/'documents'/'answer' (RAG form)")


def format_answer(answer: str) -> str:
    return f"Answer: {answer}"


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_chat(tok, messages: list[dict], where: str) -> tuple[list[int], int]:
    """(input_ids, prompt_len): the prompt is checked to be a token prefix of the whole."""
    prompt = encode_prompt(tok, messages[:-1])
    full_text = tok.apply_chat_template(messages, tokenize=False)
    full = tok(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise DataError(f"{where}: the chat template's prompt is not a token prefix of the full conversation; "
                        "the prompt/response boundary cannot be found")
    if len(full) == len(prompt):
        raise DataError(f"{where}: empty response after tokenization")
    return full, len(prompt)


def build_examples(records: list[dict], tok, cfg, source: str = "data") -> tuple[list[Example], LongStats]:
    """Tokenize every record and apply the long-example policy; nothing is dropped without a count."""
    stats = LongStats(cfg.long_policy, cfg.max_seq_len)
    out = []
    for i, record in enumerate(records):
        where = f"{source}: record {i}"
        ids, plen = encode_chat(tok, to_messages(record, where, cfg.system_prompt), where)
        if len(ids) > cfg.max_seq_len:
            if cfg.long_policy == "error":
                raise DataError(f"{where}: {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len} "
                                "(raise max_seq_len, or set data.long_policy=skip or truncate)")
            if cfg.long_policy == "truncate" and plen < cfg.max_seq_len:
                ids = ids[: cfg.max_seq_len]  # cut the end of the response; the prompt stays whole
                stats.truncated.append(i)
            else:
                stats.skipped.append(i)
                continue
        out.append(Example(i, ids, plen))
    return out, stats
