"""The data concern (docs/design.md, "Data"): what comes in, and what stage 1 and stage 2 train on.

  records.py   a data source (JSONL, Parquet, a Hugging Face dataset, the built-in set) as Arrow rows,
               each converted to the chat or RAG record
  formats.py   one `Format` object per data format (the published RAG layouts, chat)
  examples.py  records rendered with the chat template and tokenized (cached), validated, counted
  builtin.py   the seeded built-in RAG generator (fictional entities)
"""
from .examples import (COUNTED, OK, SKIPPED, TRUNCATED, UNANSWERED, Example, Examples, LongStats, cache_dir,
                       encode_chat, encode_prompt, encode_record, load_examples, pad, record_numbers,
                       tokenized_cache_key, tokenizer_fingerprint)
from .formats import DataError, Unanswerable
from .records import (BUILTIN_RAG, BUILTIN_RAG_EVAL, TOKENIZE_VERSION, convert, load_records, read_records,
                      record_settings)

__all__ = ["BUILTIN_RAG", "BUILTIN_RAG_EVAL", "COUNTED", "OK", "SKIPPED", "TOKENIZE_VERSION", "TRUNCATED",
           "UNANSWERED", "DataError", "Example", "Examples", "LongStats", "Unanswerable", "cache_dir", "convert",
           "encode_chat", "encode_prompt", "encode_record", "load_examples", "load_records", "pad", "read_records",
           "record_numbers", "record_settings", "tokenized_cache_key", "tokenizer_fingerprint"]
