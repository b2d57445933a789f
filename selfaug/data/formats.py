"""Data formats (docs/design.md, "Data formats"): users' RAG data as it comes. Each format is one
`Format` object that turns a source record into the one record the rest of selfaug reads:

- chat: {"messages": [...]}, the last message the assistant's response;
- RAG: {"question", "documents" (list of str, in the source's order, a title kept as "title: text"),
  "answer"}, plus "aliases" (the other acceptable answers of a list, for evaluation) and
  "distractors" (other documents' answers to the same question, for the strict metric) when known.

`data.format` picks one (`auto` detects it per record by its keys); `data.fields` renames the keys a
format reads, for sets that copy a published shape under other names. A record that cannot give an
answer (MS MARCO's "No Answer Present.", an empty answer) raises `Unanswerable`, which
`data.unanswerable` turns into a counted skip or an error; any other problem is a `DataError` naming
the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ..errors import SelfAugError

RAG_INSTRUCTION = "Answer the question using the documents. Reply in the form 'Answer: <answer>'."
MSMARCO_NO_ANSWER = "No Answer Present."


class DataError(SelfAugError, ValueError):
    pass


class Unanswerable(DataError):
    """A well-formed record that holds no answer to train on or to score against."""


class Fields:
    """A source record read through `data.fields`: get(name) reads the user's key for a format's name."""

    def __init__(self, record: dict, renames: dict, where: str):
        self.record, self.renames, self.where = record, renames, where

    def key(self, name: str) -> str:
        return self.renames.get(name, name)

    def named(self, name: str) -> str:
        key = self.key(name)
        return repr(key) if key == name else f"{key!r} (data.fields {name}={key})"

    def get(self, name: str, default=None):
        value = self.record.get(self.key(name))
        return default if value is None else value

    def need(self, name: str, typ: type, what: str):
        value = self.record.get(self.key(name))
        if not isinstance(value, typ):
            got = "missing" if value is None else f"a {type(value).__name__}"
            raise DataError(f"{self.where}: {what} record needs {self.named(name)} ({typ.__name__}), got {got}")
        return value

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def document(title, text) -> str:
    """A document as the prompt shows it: its title kept in front of its text."""
    text = str(text).strip()
    title = str(title).strip() if title is not None else ""
    return f"{title}: {text}" if title else text


def _strings(f: Fields, name: str, what: str) -> list[str]:
    values = f.need(name, list, what)
    if not all(isinstance(v, str) for v in values):
        raise f.error(f"{f.named(name)} must be a list of strings")
    return values


def _documents(f: Fields, name: str, what: str, text: str = "text", title: str = "title",
               strings: bool = False) -> list[str]:
    """The documents of list `name`, in order: objects {title, text} as "title: text" (and plain strings,
    where the format allows them)."""
    out = []
    for d in f.need(name, list, what):
        if strings and isinstance(d, str):
            out.append(d)
        elif isinstance(d, dict) and isinstance(d.get(text), str):
            out.append(document(d.get(title), d[text]))
        else:
            raise f.error(f"each of {f.named(name)} needs a {text!r} string (and a {title!r})"
                          + (", or is a string" if strings else ""))
    return out


def _first_answer(f: Fields, candidates: list, rule: str) -> tuple[str, list[str]]:
    """(the first non-empty answer of the candidates, the others as aliases); Unanswerable if none."""
    answers = [a.strip() for a in candidates if isinstance(a, str) and a.strip()]
    if not answers:
        raise Unanswerable(f"{f.where}: no answer to train on or score against: {rule}")
    return answers[0], [a for a in answers[1:] if a != answers[0]]


def _rag(f: Fields, what: str, question: str, answer_name: str) -> dict:
    """The RAG record of the shapes that hold (question, documents, a single answer string)."""
    out = _documents(f, "documents", what, strings=True)
    answer, aliases = _first_answer(f, [f.need(answer_name, str, what)], f"{f.named(answer_name)} is empty")
    record = {"question": f.need(question, str, what), "documents": out, "answer": answer}
    distractors = f.get("distractors")
    if isinstance(distractors, list):
        record["distractors"] = [d for d in distractors if isinstance(d, str)]
    return record


def chat(f: Fields) -> dict:
    msgs = f.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise f.error(f"{f.named('messages')} must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise f.error("each message needs a role (system|user|assistant) and a string content")
    if msgs[-1]["role"] != "assistant":
        raise f.error("the last message must be the assistant response")
    if len(msgs) < 2:
        raise f.error("a chat record needs at least one message before the assistant response")
    if not msgs[-1]["content"].strip():
        raise Unanswerable(f"{f.where}: empty assistant response")
    return {"messages": msgs}


def rag(f: Fields) -> dict:
    return _rag(f, "RAG", "question", "answer")


def ragbench(f: Fields) -> dict:
    return _rag(f, "RAGBench", "question", "response")


def crag(f: Fields) -> dict:
    """CRAG: the answer is `answer`, else the first of `alt_ans`; each search result is a document
    "page_name: page_snippet" (page_result, the whole page, is not read)."""
    docs = _documents(f, "search_results", "CRAG", text="page_snippet", title="page_name")
    alt = f.get("alt_ans", [])
    answer, aliases = _first_answer(f, [f.get("answer", "")] + (alt if isinstance(alt, list) else []),
                                    f"{f.named('answer')} and {f.named('alt_ans')} are empty")
    return {"question": f.need("query", str, "CRAG"), "documents": docs, "answer": answer, "aliases": aliases}


def msmarco(f: Fields) -> dict:
    """MS MARCO v2.1: the first well-formed answer when there is one, else the first of `answers`
    ("No Answer Present." is no answer); passages in order, as parallel lists or a list of objects."""
    passages = f.get("passages")
    if isinstance(passages, dict) and isinstance(passages.get("passage_text"), list):
        texts = passages["passage_text"]
    elif isinstance(passages, list) and all(isinstance(p, dict) for p in passages):
        texts = [p.get("passage_text") for p in passages]
    else:
        raise f.error(f"MS MARCO record needs {f.named('passages')} with 'passage_text' (parallel lists or a list "
                      "of objects)")
    if not all(isinstance(t, str) for t in texts):
        raise f.error(f"each passage_text of {f.named('passages')} must be a string")
    well = f.get("wellFormedAnswers", [])
    well = [a for a in well if a != "[]"] if isinstance(well, list) else []  # the JSON release writes "[]" for none
    answers = [a for a in _strings(f, "answers", "MS MARCO") if a.strip() != MSMARCO_NO_ANSWER]
    answer, aliases = _first_answer(f, well + answers, f"{f.named('answers')} holds none but "
                                                       f"{MSMARCO_NO_ANSWER!r}")
    return {"question": f.need("query", str, "MS MARCO"), "documents": [t.strip() for t in texts],
            "answer": answer, "aliases": aliases}


def hotpotqa(f: Fields) -> dict:
    """HotpotQA: one document per context paragraph, "title: its sentences joined", in the source's
    order; `context` as {title: [...], sentences: [[...]]} (Hugging Face) or [[title, [sentences]], ...]."""
    ctx = f.get("context")
    if isinstance(ctx, dict) and isinstance(ctx.get("title"), list) and isinstance(ctx.get("sentences"), list) \
            and len(ctx["title"]) == len(ctx["sentences"]):
        pairs = list(zip(ctx["title"], ctx["sentences"]))
    elif isinstance(ctx, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ctx):
        pairs = [tuple(p) for p in ctx]
    else:
        raise f.error(f"HotpotQA record needs {f.named('context')} as {{title: [...], sentences: [[...]]}} of equal "
                      "lengths or a list of [title, sentences] pairs")
    docs = []
    for title, sentences in pairs:
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise f.error(f"the sentences of {title!r} in {f.named('context')} must be a list of strings")
        docs.append(document(title, " ".join(s.strip() for s in sentences if s.strip())))
    answer, _ = _first_answer(f, [f.get("answer", "")], f"{f.named('answer')} is empty or missing")
    return {"question": f.need("question", str, "HotpotQA"), "documents": docs, "answer": answer}


def dpr(f: Fields) -> dict:
    """DPR / Self-RAG: the first of `answers` (the others are aliases); `ctxs` in order, "title: text"."""
    docs = _documents(f, "ctxs", "DPR")
    answer, aliases = _first_answer(f, _strings(f, "answers", "DPR"), f"{f.named('answers')} is empty")
    return {"question": f.need("question", str, "DPR"), "documents": docs, "answer": answer, "aliases": aliases}


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]  # the names it reads (data.fields renames them)
    convert: Callable[[Fields], dict]
    marks: tuple[str, ...]  # keys that identify it under data.format=auto
    unless: tuple[str, ...] = ()  # keys whose presence says it is another format

    def record(self, raw: dict, renames: dict, where: str) -> dict:
        return self.convert(Fields(raw, renames, where))


# in the order `auto` tries them: the most specific marks first
FORMATS = {f.name: f for f in (
    Format("chat", ("messages",), chat, ("messages",)),
    Format("crag", ("query", "answer", "alt_ans", "search_results"), crag, ("search_results",)),
    Format("msmarco", ("query", "answers", "wellFormedAnswers", "passages"), msmarco, ("passages",)),
    Format("dpr", ("question", "answers", "ctxs"), dpr, ("ctxs",)),
    Format("hotpotqa", ("question", "answer", "context"), hotpotqa, ("context", "question")),
    Format("ragbench", ("question", "documents", "response"), ragbench, ("documents", "response"), ("answer",)),
    Format("rag", ("question", "documents", "answer", "distractors"), rag, ("question",)),
)}
RAG_MARKS = ("question", "documents", "answer")


def detect(raw: dict, where: str) -> Format:
    """data.format=auto: the first format whose marks the record has (today's chat and RAG forms included)."""
    for fmt in FORMATS.values():
        if all(raw.get(k) is not None for k in fmt.marks) and not any(k in raw for k in fmt.unless):
            return fmt
    if any(raw.get(k) is not None for k in RAG_MARKS):
        return FORMATS["rag"]
    raise DataError(f"{where}: record has neither 'messages' (chat form) nor 'question'/'documents'/'answer' (RAG "
                    f"form) nor the keys of another known format ({', '.join(FORMATS)}); set data.format, and "
                    "data.fields for other key names")


@lru_cache(maxsize=16)
def parse_fields(text: str | None) -> dict:
    """`data.fields` "question=query,answer=response" as {format's name: the data's key}; parsed once per
    text (every record is converted with it: the result is shared, never changed)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, key = (s.strip() for s in item.partition("="))
        if not sep or not name or not key:
            raise ValueError(f"data.fields: {item.strip()!r} is not of the form name=key (e.g. question=query)")
        out[name] = key
    return out


def check_fields(fmt: str, text: str | None) -> str | None:
    """The problem with data.format / data.fields, or None."""
    try:
        renames = parse_fields(text)
    except ValueError as e:
        return str(e)
    if renames and fmt == "auto":
        return "data.fields renames the keys of one format: set data.format too (one of " + ", ".join(FORMATS) + ")"
    unknown = sorted(set(renames) - set(FORMATS[fmt].keys)) if renames else []
    if unknown:
        return (f"data.fields: data.format={fmt} reads no {', '.join(map(repr, unknown))}; its names are "
                + ", ".join(FORMATS[fmt].keys))
    return None


def to_record(raw, fmt: str, renames: dict, where: str) -> dict:
    """The chat or RAG record of a source record under data.format / data.fields."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    form = detect(raw, where) if fmt == "auto" else FORMATS[fmt]
    return form.record(raw, renames, where)


def rag_user_message(record: dict) -> str:
    docs = "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(record["documents"]))
    return f"Documents:\n{docs}\n\nQuestion: {record['question']}\n{RAG_INSTRUCTION}"


def format_answer(answer: str) -> str:
    return f"Answer: {answer}"


def to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of a converted record; the last is the assistant response."""
    if "messages" in record:
        return record["messages"]
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": rag_user_message(record)},
                   {"role": "assistant", "content": format_answer(record["answer"])}]
