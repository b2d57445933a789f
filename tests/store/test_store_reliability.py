"""No run exits 0 with a broken store or a poisoned loss, and every user mistake gets one line: each
numbered failure of the reliability issue, reproduced with builtin:tiny-llama."""
import errno
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from conftest import ROOT, clean_env, one_line as _one_line, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug import store as ts
from selfaug.cli import main
from selfaug.config import ConfigError, build_config

GOOD = json.dumps({"question": "Who?", "documents": ["Ann did it."], "answer": "Ann"})
LONG = json.dumps({"question": "Who?", "documents": ["word " * 300], "answer": "Ann"})


def _jsonl(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


# 1. two precomputes into the same directory

def test_a_second_concurrent_precompute_refuses_before_its_model_loads_and_the_first_completes(
        tmp_path, capsys, monkeypatch):
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), data={"builtin_train_size": 24},
                                                                  teacher={"shard_size": 2}))
    store = os.path.join(str(tmp_path), "teacher")
    cmd = [sys.executable, "-m", "selfaug", "precompute", "--config", recipe]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.time() + 300
    while not glob.glob(os.path.join(store, "shards", "*.json")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None  # still writing (11 shards to go)

    def no_model(*a, **k):
        raise AssertionError("the second precompute loaded its model before it looked at the lock")
    monkeypatch.setattr(precompute, "load_all", no_model)
    line = _one_line(capsys, ["precompute", "--config", recipe], "another precompute is writing")  # in this process
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert f"pid {first.pid}" in line
    assert ts.verify_store(store, values=True)[1] == [] and not glob.glob(os.path.join(store, "**", "*.tmp"), recursive=True)


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 3})
    os.makedirs(cfg.teacher.output_dir)
    with open(os.path.join(cfg.teacher.output_dir, ".lock"), "w") as f:
        f.write("host gone, pid 999999, since 2026-01-01 00:00:00")  # its holder died: no flock on it
    precompute.run(cfg)
    assert "taking over the stale lock" in capsys.readouterr().out
    assert ts.verify_store(cfg.teacher.output_dir)[1] == []


# 2. an empty shard

def test_empty_shards_read_as_no_examples_and_an_empty_store_is_refused(tmp_path):
    data = _jsonl(tmp_path, [LONG, LONG, GOOD, GOOD, GOOD])  # chunk 0 (records 0-1) is skipped whole
    cfg = tiny_config(str(tmp_path), data={"train": data, "max_seq_len": 200}, teacher={"shard_size": 2},
                      train={"micro_batch_size": 1, "max_steps": 2})
    precompute.run(cfg)
    manifest = ts.read_manifest(cfg.teacher.output_dir)
    assert manifest["shards"][0]["rows"] == 0 and manifest["totals"]["examples"] == 3
    assert len(ts.TeacherStore(cfg.teacher.output_dir)) == 3
    train.train(cfg)  # trains on the 3 examples
    empty = tiny_config(str(tmp_path / "e"), data={"train": _jsonl(tmp_path, [LONG, LONG], "long.jsonl"),
                                                   "max_seq_len": 200})
    precompute.run(empty)
    with pytest.raises(ts.StoreError, match=r"holds no examples: 2 of 2 records were skipped by "
                                            r"data.long_policy=skip \(max_seq_len=200\)"):
        train.setup(empty)


# 3. non-finite or impossible teacher values

def _poison(store, column, value, tmp_path):
    """A copy of the store with one value of shard 1 replaced, the manifest re-hashed so that only the
    value checks can catch it."""
    poisoned = str(tmp_path / f"poisoned-{column}")
    shutil.copytree(store, poisoned)
    path = os.path.join(poisoned, "shards", "shard-00001.arrow")
    table = ts.read_shard(path)
    col = table.column(column).combine_chunks()
    if column == "topk_logprobs":
        inner = col.values.values.to_numpy(zero_copy_only=False).copy()
        inner[5] = value
        fixed = pa.FixedSizeListArray.from_arrays(pa.array(inner, type=col.values.values.type), col.values.type.list_size)
        new = pa.ListArray.from_arrays(col.offsets, fixed)
    else:
        inner = col.values.to_numpy(zero_copy_only=False).copy()
        inner[3] = value
        new = pa.ListArray.from_arrays(col.offsets, pa.array(inner, type=col.values.type))
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), new)
    entry = ts.write_shard(path, table)
    manifest = json.load(open(os.path.join(poisoned, "manifest.json")))
    manifest["shards"][1].update(bytes=entry["bytes"], sha256=entry["sha256"])
    json.dump(manifest, open(os.path.join(poisoned, "manifest.json"), "w"))
    assert ts.verify_store(poisoned)[1] == []  # size and sha256 agree: only the values are wrong
    return poisoned


@pytest.mark.parametrize("column,value,match", [("topk_logprobs", float("nan"), "non-finite top-k log-prob"),
                                                ("topk_logprobs", float("inf"), "non-finite top-k log-prob"),
                                                ("tail_logprob", 0.5, "tail log-mass > 0"),
                                                ("tail_logprob", float("nan"), "NaN or \\+inf tail")])
def test_poisoned_store_values_are_refused_by_inspect_and_training(tmp_path, tiny_store, capsys, column, value, match):
    poisoned = _poison(tiny_store.teacher.output_dir, column, value, tmp_path)
    assert main(["inspect", poisoned]) == 1
    out = capsys.readouterr().out
    assert "FAIL shards/shard-00001.arrow: example" in out and ("non-finite" in out or "tail" in out)
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": poisoned})
    with pytest.raises(ts.StoreError, match=match):
        train.setup(cfg)


def test_top_k_mass_that_does_not_sum_to_one_is_refused(tmp_path, tiny_store):
    poisoned = _poison(tiny_store.teacher.output_dir, "tail_logprob", -0.01, tmp_path)  # a plausible-looking value
    with pytest.raises(ts.StoreError, match="top-k \\+ tail mass off 1"):
        ts.TeacherStore(poisoned)


def test_precompute_refuses_to_write_non_finite_values(tmp_path):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 3})
    writer = ts.StoreWriter(cfg.teacher.output_dir, {"signal": "topk", "k": 2, "id_dtype": "uint16",
                                                     "value_dtype": "float32", "compression": "none"}, {})
    rows = ts.ShardRows(np.array([7]), [np.arange(4)], np.array([3]), [np.arange(3)],
                        {"topk_ids": np.zeros((3, 2), np.uint16),
                         "topk_logprobs": np.array([[-1, -2], [np.nan, -3], [-1, -2]], np.float32),
                         "tail_logprob": np.full(3, -1.0, np.float32)})
    os.makedirs(os.path.join(cfg.teacher.output_dir, "shards"))
    with pytest.raises(ts.StoreError, match="non-finite log-probs for example 7 at position 1"):
        writer.write(0, rows, 0, 1, {})
    assert os.listdir(os.path.join(cfg.teacher.output_dir, "shards")) == []


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, tiny_store):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"optim": "sgd", "learning_rate": 1e30, "max_grad_norm": 1e30, "max_steps": 4})
    with pytest.raises(train.TrainError, match=r"optimizer step \d: the .* terms? (is|are) not finite"):
        train.train(cfg)
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "final"))
    for line in open(os.path.join(cfg.train.output_dir, "metrics.jsonl")):
        assert all(math.isfinite(v) for v in json.loads(line).values())  # strict JSON, finite


# 4. NaN and out-of-range config values

BASE = {"model": {"name_or_path": "x"}, "data": {"train": "y"}}


@pytest.mark.parametrize("override,match", [
    ("train.alpha=nan", "finite"), ("train.learning_rate=-1", "train.learning_rate=-1.0 must be > 0"),
    ("train.max_grad_norm=-1", "must be > 0"), ("train.warmup_steps=-1", "must be >= 0"),
    ("train.save_steps=-2", "must be >= 0"), ("train.lora_r=0", "train.lora_r=0 must be >= 1"),
    ("train.lora_dropout=2", "must be < 1"), ("train.min_lr_ratio=5", "must be <= 1"),
    ("eval.batch_size=0", "must be >= 1"), ("train.logging_steps=0", "must be >= 1"),
    ("data.max_examples=-3", "data.max_examples=-3 must be >= 1"), ("train.learning_rate=inf", "finite"),
])
def test_out_of_range_config_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config(BASE, [override])


def test_missing_deepspeed_file_is_refused_before_any_model_loads(tmp_path, capsys):
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path)))
    _one_line(capsys, ["train", "--config", recipe, "train.deepspeed=ds_configs/missing.json"],
              "train.deepspeed: file 'ds_configs/missing.json' not found")  # the first check of setup


# 5. record numbers in data errors, before any shard

def test_a_bad_record_is_named_by_its_source_index_before_any_shard(tmp_path, capsys):
    lines = [GOOD] * 12 + [json.dumps({"question": "Who?", "documents": ["x"]})] + [GOOD] * 3
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), data={"train": _jsonl(tmp_path, lines)},
                                                                  teacher={"shard_size": 5}))
    _one_line(capsys, ["precompute", "--config", recipe], "record 12: RAG record needs 'answer'")
    assert not glob.glob(os.path.join(str(tmp_path), "teacher", "shards", "*.arrow"))


def test_non_utf8_data_names_the_line(tmp_path, capsys):
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), data={
        "train": _jsonl(tmp_path, [GOOD, b'{"question": "caf\xe9"}'])}))
    _one_line(capsys, ["precompute", "--config", recipe], "d.jsonl:2: not UTF-8")


# 6. an empty, torn or missing manifest.json (a power loss while it was rewritten)

def _store_copy(tmp_path, tiny_store):
    store = str(tmp_path / "store")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), teacher={
        "value_dtype": "float32", "output_dir": store}))
    return store, recipe, ts.read_manifest(store)


def test_an_empty_or_torn_manifest_is_rebuilt_from_the_shards_and_overwrite_is_never_suggested(
        tmp_path, tiny_store, capsys):
    store, recipe, before = _store_copy(tmp_path, tiny_store)
    shards = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(store, "shards", "*.arrow"))}
    open(os.path.join(store, "manifest.json"), "w").close()  # empty, as a power loss can leave it
    for argv in (["inspect", store], ["train", "--config", recipe]):
        line = _one_line(capsys, argv, f"selfaug inspect --repair {store}")
        assert "overwrite" not in line and "run the same `selfaug precompute` again" in line
    summary = precompute.run(tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store}))
    assert summary["shards_computed"] == 0 and summary["shards_reused"] == 3  # no shard computed again
    assert "rebuilt from the shards that verify" in capsys.readouterr().out
    after = ts.read_manifest(store)
    assert after["shards"] == before["shards"] and after["totals"] == before["totals"]
    assert {p: os.path.getmtime(p) for p in shards} == shards and ts.verify_store(store, values=True)[1] == []
    # torn in the middle; teacher.overwrite=true with the same settings deletes no shard either
    text = open(os.path.join(store, "manifest.json")).read()
    open(os.path.join(store, "manifest.json"), "w").write(text[:len(text) // 2])
    assert main(["precompute", "--config", recipe, "teacher.overwrite=true"]) == 0
    assert {p: os.path.getmtime(p) for p in shards} == shards and ts.read_manifest(store)["shards"] == before["shards"]
    # missing, with shards: `selfaug inspect --repair` rebuilds it without a model
    os.remove(os.path.join(store, "manifest.json"))
    _one_line(capsys, ["inspect", store], "has shards but no manifest.json")
    capsys.readouterr()
    assert main(["inspect", "--repair", store]) == 0
    assert "all 3 shards verified" in capsys.readouterr().out
    after = ts.read_manifest(store)
    assert after["shards"] == before["shards"] and after["totals"] == before["totals"]
    assert after["settings"] == before["settings"] and after["config"]["teacher"]["output_dir"] == store
    assert {p: os.path.getmtime(p) for p in shards} == shards


def test_repair_with_a_bad_shard_writes_an_incomplete_manifest_that_precompute_finishes(tmp_path, tiny_store, capsys):
    store, recipe, before = _store_copy(tmp_path, tiny_store)
    victim = os.path.join(store, "shards", "shard-00001.arrow")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    open(os.path.join(store, "manifest.json"), "w").write('{"format": "selfaug-teacher-st')
    stale = os.path.join(store, "shards", "shard-00001.arrow.gone-host-99999.tmp")  # left by a stopped precompute
    open(stale, "wb").write(b"partial")
    assert main(["inspect", "--repair", store]) == 1
    out = capsys.readouterr().out
    assert "shard-00001.arrow does not match its sha256" in out and "1 of 3 shards" in out
    assert ts.read_manifest(store)["status"] == "incomplete" and not os.path.exists(stale)
    summary = precompute.run(tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store}))
    assert summary["shards_computed"] == 1 and ts.read_manifest(store)["shards"] == before["shards"]


def test_a_torn_manifest_with_shards_of_other_settings_is_refused_naming_them(tmp_path, tiny_store, capsys):
    store, _, _ = _store_copy(tmp_path, tiny_store)
    open(os.path.join(store, "manifest.json"), "w").close()
    recipe = write_recipe(str(tmp_path / "k4.yaml"), tiny_config(str(tmp_path), teacher={
        "value_dtype": "float32", "output_dir": store, "k": 4}))
    _one_line(capsys, ["precompute", "--config", recipe], "k (store: 8, recipe: 4)")
    assert len(glob.glob(os.path.join(store, "shards", "*.arrow"))) == 3  # refused: nothing deleted


def test_stale_temporary_files_of_a_stopped_precompute_are_removed(tmp_path, tiny_store):
    store, _, _ = _store_copy(tmp_path, tiny_store)
    os.remove(os.path.join(store, "shards", "shard-00002.arrow"))  # the precompute stopped while writing it
    stale = [os.path.join(store, "shards", "shard-00002.arrow.gone-host-99999.tmp"),
             os.path.join(store, "manifest.json.gone-host-99999.tmp")]
    for path in stale:
        open(path, "wb").write(b"partial")
    summary = precompute.run(tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store}))
    assert summary["shards_computed"] == 1 and not any(os.path.exists(p) for p in stale)


# 7. the manifest's k against the shards' schema

def test_a_manifest_whose_k_differs_from_the_shards_is_refused(tmp_path, tiny_store, capsys):
    store = str(tmp_path / "store")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    manifest["settings"]["k"] = 4
    json.dump(manifest, open(os.path.join(store, "manifest.json"), "w"))
    assert main(["inspect", store]) == 1
    assert "schema does not match the manifest (manifest: signal=topk, k=4" in capsys.readouterr().out
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store, "k": 4})
    with pytest.raises(ts.StoreError, match="k=4"):
        train.setup(cfg)


# 9. raw tracebacks for user errors

def test_user_errors_are_one_line(tmp_path, capsys):
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: builtin:tiny-llama\ndata: {train: builtin:rag}\n")
    _one_line(capsys, ["train", "--config", str(scalar)], "section 'model' must be a mapping")
    listed = tmp_path / "list.yaml"
    listed.write_text("model: [1, 2]\n")
    _one_line(capsys, ["train", "--config", str(listed)], "section 'model' must be a mapping")
    _one_line(capsys, ["train", "--config", str(tmp_path)], "is a directory")
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path)))
    _one_line(capsys, ["train", "--config", recipe], "is not a teacher store")  # a StoreError at run time


def test_disk_full_names_the_directory_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), data={"builtin_train_size": 3}))
    real = os.fsync

    def full(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".tmp") and ".arrow." in path:  # a shard's (config.yaml and the manifest have their own)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(fd)
    monkeypatch.setattr(os, "fsync", full)
    line = _one_line(capsys, ["precompute", "--config", recipe], "no space left on the device holding")
    assert os.path.join(str(tmp_path), "teacher", "shards") in line
    assert not glob.glob(os.path.join(str(tmp_path), "**", "*.tmp"), recursive=True)
