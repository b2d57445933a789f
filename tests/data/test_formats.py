"""Users' RAG data as it comes (selfaug/formats.py): each format's hand-written fixture renders to the
exact prompt and answer, a bad record is named by its number, records without an answer follow
data.unanswerable, and evaluation reads the same formats."""
import json
import os

import pytest

from conftest import ROOT, tiny_config
from selfaug.data import formats
from selfaug.config import ConfigError
from selfaug.data import DataError, load_examples, read_records
from selfaug.models import load_tokenizer
from selfaug.train.sources import DataExamples
from selfaug.store import PositionRule

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "formats")
INSTR = "\nAnswer the question using the documents. Reply in the form 'Answer: <answer>'."


def _prompt(docs, question):
    return "Documents:\n" + "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(docs)) + f"\n\nQuestion: {question}" + INSTR


# format -> [(user message, assistant message)] of its fixture's records, in order (None: no answer)
EXPECTED = {
    "crag": [
        (_prompt(["Tolvar Shipping - About us: Tolvar Shipping has its head office in Rotterdam.",
                  "Brenmoor Lines: Brenmoor Lines is based in Antwerp."],
                 "where is the head office of tolvar shipping?"), "Answer: rotterdam"),
        (_prompt(["Glass Harbour (song): Glass Harbour is a 1998 song written by Mira Ostend."],
                 "who wrote the song glass harbour?"), "Answer: mira ostend"),  # empty answer: the first alt_ans
    ],
    "msmarco": [
        (_prompt(["Kettles come in many shapes.", "A solar kettle takes about 20 minutes to boil a litre of water.",
                  "Boiling point depends on altitude."], "how long does a solar kettle take to boil water"),
         "Answer: A solar kettle takes about 20 minutes to boil water."),  # the well-formed answer first
        (_prompt(["The Vrael River rises near Zhenport.", "Zhenport has a small harbour."],
                 "where does the vrael river rise"), "Answer: Zhenport"),
        None,  # "No Answer Present."
    ],
    "hotpotqa": [
        (_prompt(["Daro Kelth: Daro Kelth is an engineer. He trained under Ulm Vasser.",
                  "Ulm Vasser: Ulm Vasser grew up in Brenford. He built bridges."],
                 "Which city did the mentor of Daro Kelth grow up in?"), "Answer: Brenford"),
        (_prompt(["Zorn River: The Zorn River is 120 kilometres long.",
                  "Kavel River: The Kavel River is 340 kilometres long. It is known for its silver fish."],
                 "Are the Zorn and the Kavel rivers of the same length?"), "Answer: no"),  # the original JSON layout
    ],
    "dpr": [
        (_prompt(["Wind clock: The wind clock was invented by Sela Marrow in 1802.",
                  "Glass compass: The glass compass was invented by Ode Brann."], "who invented the wind clock"),
         "Answer: Sela Marrow"),
        (_prompt(["Quarrel Industries: Quarrel Industries was founded in 1871."], "when was quarrel industries founded"),
         "Answer: 1871"),
    ],
    "ragbench": [
        (_prompt(["Dravon Industries makes folding bicycles.", "Kessa Industries makes ice skates."],
                 "What does Dravon Industries make?"), "Answer: Dravon Industries makes folding bicycles."),
    ],
}

# a broken record of each format, and the words its error must hold
BAD = {
    "crag": ({"query": "q?", "answer": "a", "alt_ans": [], "search_results": [{"page_name": "p"}]}, "page_snippet"),
    "msmarco": ({"query": "q", "answers": ["a"], "wellFormedAnswers": [], "passages": {"url": ["u"]}}, "passage_text"),
    "hotpotqa": ({"question": "q?", "answer": "a", "context": {"title": ["t", "u"], "sentences": [["s"]]}},
                 "equal lengths"),
    "dpr": ({"question": "q", "answers": ["a"], "ctxs": "not a list"}, "'ctxs' (list)"),
    "ragbench": ({"question": "q", "documents": ["d"]}, "'response' (str)"),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-llama")


def _rows(name):
    return [json.loads(line) for line in open(os.path.join(FIXTURES, f"{name}.jsonl"))]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("chosen", ["auto", "named"])
def test_each_format_renders_the_expected_prompt_and_answer(name, chosen):
    fmt = name if chosen == "named" else "auto"
    for i, (raw, want) in enumerate(zip(_rows(name), EXPECTED[name])):
        if want is None:
            with pytest.raises(formats.Unanswerable, match=f"record {i}: no answer"):
                formats.to_record(raw, fmt, {}, f"{name}: record {i}")
            continue
        msgs = formats.to_messages(formats.to_record(raw, fmt, {}, f"{name}: record {i}"))
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert (msgs[0]["content"], msgs[1]["content"]) == want


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_record_of_each_format_is_named_by_its_number(tmp_path, tok, name):
    record, words = BAD[name]
    lines = [json.dumps(r) for r in _rows(name)]
    lines.insert(1, json.dumps(record))
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(str(tmp_path), data={"train": str(path), "format": name, "unanswerable": "skip"})
    with pytest.raises(DataError) as e:
        load_examples(cfg.data.train, tok, cfg.data)
    assert "record 1:" in str(e.value) and words in str(e.value), str(e.value)


def test_records_without_an_answer_are_an_error_or_skipped_with_their_numbers(tmp_path, tok):
    path = os.path.join(FIXTURES, "msmarco.jsonl")
    cfg = tiny_config(str(tmp_path), data={"train": path, "format": "msmarco"})
    with pytest.raises(DataError, match=r"record 2: no answer .*'No Answer Present\.'.*data\.unanswerable=skip"):
        load_examples(cfg.data.train, tok, cfg.data)
    cfg = tiny_config(str(tmp_path), data={"train": path, "format": "msmarco", "unanswerable": "skip"})
    loaded = load_examples(cfg.data.train, tok, cfg.data)
    assert loaded.left_out() == "3 records; 1 without an answer skipped (data.unanswerable=skip) (records 2)"
    kept, stats = loaded.examples()
    assert [e.example_id for e in kept] == [0, 1] and stats.unanswered == [2] and stats.to_dict()["unanswered"] == 1
    only_unanswered = tmp_path / "none.jsonl"
    only_unanswered.write_text(open(path).read().splitlines()[2] + "\n")
    cfg_none = tiny_config(str(tmp_path), data={"train": str(only_unanswered), "format": "msmarco",
                                                "unanswerable": "skip"})
    with pytest.raises(DataError, match=r"no example is left: 1 records; 1 without an answer skipped"):
        DataExamples(load_examples(cfg_none.data.train, tok, cfg_none.data), PositionRule.of(cfg_none.teacher))
    records, unanswered = read_records(path, cfg.data)  # evaluation reads the same formats
    assert [r["answer"] for r in records] == ["A solar kettle takes about 20 minutes to boil water.", "Zhenport"]
    assert records[0]["aliases"] == ["about 20 minutes"] and unanswered == [2]


def test_fields_rename_a_formats_keys_and_are_checked(tmp_path, tok):
    path = os.path.join(FIXTURES, "dpr_renamed.jsonl")
    cfg = tiny_config(str(tmp_path), data={"train": path, "format": "dpr",
                                           "fields": "question=query,answers=gold,ctxs=retrieved"})
    with pytest.raises(DataError, match=r"record 0: each of 'retrieved' \(data.fields ctxs=retrieved\) needs"):
        formats.to_record({"query": "q", "gold": ["a"], "retrieved": [{"title": "t"}]}, "dpr",
                          formats.parse_fields(cfg.data.fields), "x: record 0")
    (record,), _ = read_records(path, cfg.data)
    assert formats.to_messages(record)[0]["content"] == _prompt(
        ["Wind clock: The wind clock was invented by Sela Marrow in 1802."], "who invented the wind clock")
    assert load_examples(cfg.data.train, tok, cfg.data).examples()[0][0].prompt_len > 0
    cfg = tiny_config(str(tmp_path), data={"train": path, "format": "dpr", "fields": "question=query,ctxs=retrieved"})
    with pytest.raises(DataError, match=r"record 0: DPR record needs 'answers' \(list\), got missing"):
        read_records(path, cfg.data)
    with pytest.raises(ConfigError, match="set data.format too"):
        tiny_config(str(tmp_path), data={"train": path, "fields": "question=query"})
    with pytest.raises(ConfigError, match="data.format=dpr reads no 'response'"):
        tiny_config(str(tmp_path), data={"train": path, "format": "dpr", "fields": "response=x"})
    with pytest.raises(ConfigError, match="not of the form name=key"):
        tiny_config(str(tmp_path), data={"train": path, "format": "dpr", "fields": "query"})


def test_format_settings_key_the_caches_and_stores_only_when_set():
    from selfaug.data import record_settings
    from selfaug.config import build_config
    base = {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "x.jsonl"}}
    assert record_settings(build_config(base).data) == {}  # stores made before data.format still match
    cfg = build_config(base, ["data.format=dpr", "data.fields=ctxs=retrieved,answers=gold", "data.unanswerable=skip"])
    assert record_settings(cfg.data) == {"format": "dpr", "fields": "answers=gold,ctxs=retrieved",
                                         "unanswerable": "skip"}


def test_only_the_config_and_the_formats_module_name_a_format():
    """One object per format: no other module branches on a format's name."""
    import glob
    for path in glob.glob(os.path.join(ROOT, "selfaug", "**", "*.py"), recursive=True):
        if os.path.basename(path) in ("config.py", "schema.py", "formats.py"):
            continue
        text = open(path).read()
        for word in ("crag", "msmarco", "hotpotqa", "ragbench", '"dpr"'):
            assert word not in text.lower(), f"{path} names {word}: ask formats.FORMATS instead"


def test_eval_reads_its_rag_set_in_any_format_with_aliases_and_rivals(tmp_path, tok):
    from selfaug.eval import evaluate
    cfg = tiny_config(str(tmp_path), data={"eval": os.path.join(FIXTURES, "dpr.jsonl")})  # train: builtin, auto
    rag = evaluate._rag_set(cfg, tok)
    assert rag.golds == [["Sela Marrow", "Marrow"], ["1871"]] and rag.unanswered == []
    assert rag.others == [[], []]  # neither record's documents hold the other's answer
    assert tok.decode(rag.prompts[1]).count("Quarrel Industries was founded in 1871.") == 1
    assert evaluate.strict_correct("Answer: Marrow", rag.golds[0], rag.others[0])


def test_rag_documents_may_be_titled_objects():
    raw = {"question": "Who?", "documents": ["Plain text.", {"title": "Ann", "text": "Ann did it."}], "answer": "Ann"}
    assert formats.to_record(raw, "rag", {}, "x")["documents"] == ["Plain text.", "Ann: Ann did it."]
    with pytest.raises(DataError, match=r"x: each of 'documents' needs a 'text' string \(and a 'title'\), or is a"):
        formats.to_record({**raw, "documents": [{"title": "Ann"}]}, "rag", {}, "x")
