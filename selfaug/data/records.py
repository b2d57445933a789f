"""Records (docs/design.md, "Data"): a data source (JSONL, Parquet, a Hugging Face dataset or the
built-in RAG generator) as memory-mapped Arrow rows (`datasets`), and each row converted through
`formats` into the chat or RAG record the rest of selfaug reads. A JSONL file's lines are parsed one by
one (so a malformed line is named by its number); a byte-order mark, CRLF line ends and blank lines
are accepted as the common tools write them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

from . import builtin, formats
from .formats import DataError
from ..hashing import sha256_file

BUILTIN_RAG = "builtin:rag"
BUILTIN_RAG_EVAL = "builtin:rag-eval"
TOKENIZE_VERSION = 1  # bump when the rendering changes: it keys the tokenization cache

def _jsonl_lines(path: str):
    """One row per non-empty line: its text and line number. Parsing happens in the tokenizing map,
    so a malformed line or a record of another shape is reported with its line, never by Arrow's
    schema inference."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:  # a byte-order mark at the start of the file, as some editors write it, is not data
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); "
                                "re-encode the file as UTF-8") from None
            if line.strip():  # blank lines (and CRLF line ends) are what common tools write
                yield {"_json": line, "_line": lineno}


def _has_a_record(path: str) -> bool:
    """Whether a JSONL file has a non-blank line, by the reader's own rule (an empty file gives no data set
    at all; a line that is not UTF-8 raises its DataError here)."""
    return next(_jsonl_lines(path), None) is not None


def _builtin_rows(split: str, size: int, seed: int, num_documents: int, max_documents, extra_sentences: int):
    yield from builtin.iter_records(split, size, seed, num_documents, max_documents, extra_sentences)


def load_records(source: str, cfg):
    """(datasets.Dataset of raw records, fingerprint) of a data source; `cfg` is the DataConfig."""
    import datasets
    if source.startswith("builtin:"):
        split = {BUILTIN_RAG: "train", BUILTIN_RAG_EVAL: "eval"}.get(source)
        if split is None:
            raise DataError(f"unknown built-in data set {source!r}; built-ins: {BUILTIN_RAG}, {BUILTIN_RAG_EVAL}")
        shape = {"num_documents": cfg.builtin_num_documents}
        if cfg.builtin_max_documents is not None or cfg.builtin_extra_sentences:  # fixed sets keep their digest
            shape.update(max_documents=cfg.builtin_max_documents, extra_sentences=cfg.builtin_extra_sentences)
        params = {"name": source, "train_size": cfg.builtin_train_size, "eval_size": cfg.builtin_eval_size,
                  "seed": cfg.builtin_seed, **shape}
        size = cfg.builtin_train_size if split == "train" else cfg.builtin_eval_size
        if cfg.max_examples is not None:
            size = min(size, cfg.max_examples)  # generate no more than is used
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        ds = datasets.Dataset.from_generator(
            _builtin_rows, gen_kwargs={"split": split, "size": size, "seed": cfg.builtin_seed,
                                       "num_documents": cfg.builtin_num_documents,
                                       "max_documents": cfg.builtin_max_documents,
                                       "extra_sentences": cfg.builtin_extra_sentences},
            fingerprint=f"{split}-{size}-{digest[:32]}-v{TOKENIZE_VERSION}-g2")  # g2: records carry distractors
        fp = {"source": source, "sha256": digest}
    elif source.endswith((".jsonl", ".json")) and os.path.isfile(source):
        if not _has_a_record(source):
            raise DataError(f"data source {source!r} holds no records (the file is empty or only blank lines)")
        digest = sha256_file(source)
        try:
            ds = datasets.Dataset.from_generator(_jsonl_lines, gen_kwargs={"path": source},
                                                 features=datasets.Features({"_json": datasets.Value("string"),
                                                                             "_line": datasets.Value("int64")}),
                                                 fingerprint=f"jsonl-{digest[:32]}")
        except Exception as e:  # datasets wraps what the generator raises
            cause = e
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise
        fp = {"source": os.path.abspath(source), "sha256": digest}
    elif source.endswith(".parquet") and os.path.isfile(source):
        ds = datasets.Dataset.from_parquet(source)
        fp = {"source": os.path.abspath(source), "sha256": sha256_file(source)}
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data source {source!r}: not found or not a .jsonl/.parquet file")
    else:
        try:
            ds = datasets.load_dataset(source, split=cfg.split)
        except Exception as e:  # offline, unknown name, ...
            raise DataError(f"could not load Hugging Face dataset {source!r} (split {cfg.split!r}): {e}") from e
        fp = {"source": f"hf:{source}:{cfg.split}", "sha256": ds._fingerprint}
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
        fp["max_examples"] = cfg.max_examples
    if len(ds) == 0:
        raise DataError(f"data source {source!r} holds no records")
    fp["records"] = len(ds)
    return ds, fp


def read_records(source: str, cfg, limit: int | None = None) -> tuple[list[dict], list[int]]:
    """The converted records of the first `limit` records of a small set (evaluation prompts), and the
    numbers of those data.unanswerable=skip left out."""
    ds, _ = load_records(source, cfg)
    rows = ds.select(range(min(limit or len(ds), len(ds)))).to_list()
    records, unanswered = [], []
    for i, row in enumerate(rows):
        record = convert(row, source, i, cfg)
        (unanswered.append(i) if record is None else records.append(record))
    return records, unanswered


def _record(row: dict, source: str, index: int) -> dict:
    """A row of load_records as the record it stands for (JSONL rows are parsed here)."""
    if "_json" in row:
        try:
            return json.loads(row["_json"])
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{row['_line']}: malformed JSON ({e.msg} at column {e.colno}) in record "
                            f"{index}") from None
        except RecursionError:
            raise DataError(f"{source}:{row['_line']}: record {index} is JSON nested too deeply to read (over "
                            f"{sys.getrecursionlimit()} levels)") from None
    return {k: v for k, v in row.items() if v is not None}  # Arrow fills a column missing from a record with None


def record_settings(cfg) -> dict:
    """The data settings beyond the source that change what a record becomes (data.format, data.fields,
    data.unanswerable); empty at their defaults, so that caches and stores made before them still match."""
    out = {}
    if cfg.format != "auto" or cfg.fields:
        renames = formats.parse_fields(cfg.fields)
        out.update(format=cfg.format, fields=",".join(f"{k}={v}" for k, v in sorted(renames.items())))
    if cfg.unanswerable != "error":
        out["unanswerable"] = cfg.unanswerable
    return out


def convert(row: dict, source: str, index: int, cfg) -> dict | None:
    """The chat or RAG record (formats.py) of row `index` of load_records; None for a record without an
    answer under data.unanswerable=skip (an error under `error`)."""
    where = f"{source}: record {index}"
    try:
        return formats.to_record(_record(row, source, index), cfg.format, formats.parse_fields(cfg.fields), where)
    except formats.Unanswerable as e:
        if cfg.unanswerable == "error":
            raise DataError(f"{e}; data.unanswerable=skip skips such records (counted, with their numbers)") from None
        return None
