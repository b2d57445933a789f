"""Bad data never gives a traceback: any data file, however malformed, ends in examples (and a store that
`selfaug inspect` passes) or in one DataError naming the file and the record. Generated records and byte
strings go through the record reader, the formats and the tokenizer (hypothesis); the habits of common
tools (a byte-order mark, CRLF, blank lines) are accepted."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config, write_recipe
from selfaug.data import DataError, load_examples
from selfaug.models import load_tokenizer

KEYS = ["messages", "role", "content", "question", "documents", "answer", "title", "text", "query", "answers",
        "ctxs", "passages", "passage_text", "search_results", "page_name", "page_snippet", "context", "response",
        "alt_ans", "wellFormedAnswers", "sentences", "distractors"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12) | \
    st.sampled_from(["\ud800", "a\udfffb", "", " ", "No Answer Present.", "\x00", "\u202e", "🙂"])
SCALAR = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | TEXT
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) |
                     st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=4), max_leaves=12)
RECORD = st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=5) | VALUE
GOOD = st.builds(lambda q, d, a: {"question": q, "documents": d, "answer": a},
                 st.text(min_size=1, max_size=20), st.lists(st.text(max_size=20), min_size=1, max_size=2),
                 st.text(min_size=1, max_size=8).filter(str.strip))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-llama")


def _line(record) -> bytes:
    """One JSONL line; a lone surrogate is written as JSON writes it (an escape), as real files carry it."""
    return json.dumps(record, ensure_ascii=True, allow_nan=True).encode()


def _load_or_one_error(path, tok, tmp_path, **data):
    cfg = tiny_config(str(tmp_path), data={"train": str(path), "max_seq_len": 256, **data})
    try:
        return load_examples(str(path), tok, cfg.data)
    except DataError as e:
        message = str(e)
        assert "\n" not in message.strip() and str(path) in message, message
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(records=st.lists(RECORD | GOOD, min_size=0, max_size=4), junk=st.lists(st.binary(max_size=20), max_size=2),
       bom=st.booleans(), crlf=st.booleans())
def test_any_records_or_bytes_give_examples_or_one_data_error(tmp_path_factory, tok, records, junk, bom, crlf):
    tmp = tmp_path_factory.mktemp("records")
    path = tmp / "data.jsonl"
    lines = [_line(r) for r in records] + list(junk)
    end = b"\r\n" if crlf else b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + end.join(lines) + end)
    examples = _load_or_one_error(path, tok, tmp, unanswerable="skip")
    if examples is not None:
        kept, _ = examples.examples()
        assert all(0 < e.prompt_len < len(e.input_ids) for e in kept)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_any_bytes_at_all_give_one_data_error_or_examples(tmp_path_factory, tok, blob):
    tmp = tmp_path_factory.mktemp("bytes")
    path = tmp / "data.jsonl"
    path.write_bytes(blob)
    _load_or_one_error(path, tok, tmp)


def test_the_named_cases_are_one_line_each(tmp_path, tok):
    cases = {
        "empty.jsonl": (b"", r"holds no records"),
        "blank.jsonl": (b"\n\r\n  \n", r"holds no records"),
        "deep.jsonl": (b"[" * 100000 + b"]" * 100000 + b"\n", r"record 0 .*nested too deeply"),
        "surrogate.jsonl": (_line({"question": "q\ud800?", "documents": ["d"], "answer": "a"}) + b"\n",
                            r"record 0 .*cannot be encoded|invalid Unicode"),
        "array.jsonl": (b"[1, 2]\n", r"expected a JSON object, got list"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        cfg = tiny_config(str(tmp_path), data={"train": str(path)})
        with pytest.raises(DataError, match=pattern):
            load_examples(str(path), tok, cfg.data)


def test_a_bom_crlf_file_with_blank_lines_is_read_like_a_plain_one(tmp_path, tok):
    records = [{"question": f"Who made thing {i}?", "documents": [f"Thing {i} was made by Ann{i}."],
                "answer": f"Ann{i}"} for i in range(3)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([json.dumps(records[0]).encode(), b"", json.dumps(
        records[1]).encode(), b"   ", json.dumps(records[2]).encode()]) + b"\r\n")
    cfg = tiny_config(str(tmp_path), data={"train": str(plain)})
    a, _ = load_examples(str(plain), tok, cfg.data).examples()
    b, _ = load_examples(str(windows), tok, cfg.data).examples()
    assert [e.input_ids for e in a] == [e.input_ids for e in b] and len(a) == 3


def test_a_generated_store_passes_inspect_and_a_bad_file_is_one_cli_line(tmp_path, capsys):
    """End to end through the command line: a good file becomes a store that `selfaug inspect` passes; a
    file with invalid Unicode in record 2 is one `selfaug: error:` line naming the file and the record."""
    from selfaug.cli import main
    good = [{"question": "Where is X?", "documents": ["X is in Y.", "Z is in W."], "answer": "Y"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "good.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(_line(r) for r in good) + b"\r\n")
    cfg = tiny_config(str(tmp_path), data={"train": str(path)}, teacher={"shard_size": 1})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    assert main(["precompute", "--config", recipe]) == 0
    assert main(["inspect", cfg.teacher.output_dir]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(_line(r) for r in good + [{"question": "\udcff", "documents": ["d"], "answer": "a"}]))
    capsys.readouterr()
    assert main(["precompute", "--config", recipe, f"data.train={bad}",
                 f"teacher.output_dir={tmp_path / 'bad_store'}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0].startswith("selfaug: error:") and "bad.jsonl" in errors[0] and "record 2" in errors[0], errors
