"""Stage 1: the stored top-k equals an independent full-vocabulary log_softmax + topk, at exactly
the positions of each mode; the store is the same from 1 or 2 ranks (which share the chunks left of a
resumed store) and after a kill and restart."""
import glob
import json
import os
import shutil
import time

import datasets
import pytest
import torch

from conftest import kill_ranks, launch, spawn, tiny_config, write_recipe
from selfaug import precompute
from selfaug import store as ts
from selfaug.config import build_config
from selfaug.hashing import sha256_file
from selfaug.models import load_model
from selfaug.store.writer import share_chunks


def _reference(model, input_ids):
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()  # (T, V): whole, plainly
    return torch.log_softmax(logits, -1)


def _check_against_reference(store_dir, model, mode, value_tol):
    files = sorted(glob.glob(os.path.join(store_dir, "shards", "*.arrow")))
    assert files
    for path in files:
        ds = datasets.Dataset.from_file(path)  # readable as it is by datasets
        for row in ds:
            ids, P = row["input_ids"], row["prompt_len"]
            expected = {"prompt": list(range(P)), "response": list(range(P, len(ids))),
                        "all": list(range(len(ids)))}[mode]
            assert row["positions"] == expected
            logp = _reference(model, ids)[expected]  # (N, V)
            ref_v, _ = logp.topk(len(row["topk_ids"][0]), dim=-1)
            got_ids = torch.tensor(row["topk_ids"], dtype=torch.long)
            got_v = torch.tensor(row["topk_logprobs"], dtype=torch.float32)
            assert torch.allclose(got_v, ref_v, atol=value_tol, rtol=value_tol)  # the k largest values
            assert torch.allclose(logp.gather(1, got_ids), got_v, atol=value_tol, rtol=value_tol)  # at their ids
            assert (got_v[:, :-1] >= got_v[:, 1:]).all()  # descending
            # log(1 - sum of p over the top-k), as the mass of everything else (1 - sum cancels in fp32)
            ref_tail = logp.double().scatter(1, got_ids, float("-inf")).logsumexp(-1)
            tail = torch.tensor(row["tail_logprob"], dtype=torch.float64)
            visible = ref_tail > -12  # below e^-12 the mass is under fp32's resolution of 1: only check it is tiny
            assert torch.allclose(tail[visible], ref_tail[visible], atol=1e-3)
            assert (tail[~visible] < -10).all()


@pytest.mark.parametrize("mode,value_dtype,tol", [("prompt", "float16", 2e-2), ("response", "float32", 1e-4),
                                                  ("all", "float32", 1e-4)])
def test_store_equals_full_vocabulary_reference(tmp_path, mode, value_dtype, tol):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 4},
                      teacher={"positions": mode, "value_dtype": value_dtype, "shard_size": 3})
    summary = precompute.run(cfg)
    manifest = json.load(open(os.path.join(cfg.teacher.output_dir, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["settings"]["id_dtype"] == "uint16"
    assert summary["examples"] == 4 and len(manifest["shards"]) == 2
    _check_against_reference(cfg.teacher.output_dir, load_model("builtin:tiny-llama"), mode, tol)
    assert ts.verify_store(cfg.teacher.output_dir)[1] == []


def _shard_hashes(store_dir):
    return {os.path.basename(p): sha256_file(p) for p in sorted(glob.glob(os.path.join(store_dir, "shards", "*.arrow")))}


def test_the_chunks_left_are_dealt_round_robin_over_the_ranks():
    """A store resumed after the chunks of one residue class were done (rank 1's of an earlier run on 2 ranks):
    each rank gets half of what is left, not rank 0 all of it, on any number of ranks."""
    left = [j for j in range(10) if j % 2 == 0]
    assert share_chunks(left, 2) == [[0, 4, 8], [2, 6]]  # chunk j on rank j mod 2: [[0, 2, 4, 6, 8], []]
    assert share_chunks(list(reversed(left)), 2) == share_chunks(left, 2)  # the same on every rank
    assert share_chunks(left, 3) == [[0, 6], [2, 8], [4]]
    assert share_chunks([], 2) == [[], []] and share_chunks([5], 4) == [[5], [], [], []]


def test_two_ranks_and_restart_after_kill_give_the_same_store(tmp_path, tiny_store, capsys):
    one = _shard_hashes(tiny_store.teacher.output_dir)
    assert len(one) == 3  # 12 records / 5 per shard
    # two processes, real torch.distributed over gloo, resuming a store of which chunk 1 is done: the two
    # chunks left (0 and 2, both rank 0's under chunk j on rank j mod 2) are shared, one each
    two_dir = str(tmp_path / "two")
    shutil.copytree(tiny_store.teacher.output_dir, two_dir)
    for j in (0, 2):
        os.remove(os.path.join(two_dir, "shards", f"shard-{j:05d}.arrow"))
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": two_dir})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    out = launch("precompute", recipe, nprocs=2)
    assert "2 shards computed (1 + 1 on 2 ranks, 7 examples), 1 reused" in out.stdout, out.stdout[-2000:]
    assert _shard_hashes(two_dir) == one
    # one rank killed after its first shard, then restarted (in this process)
    killed_dir = str(tmp_path / "killed")
    procs, port = spawn("precompute", recipe, [f"teacher.output_dir={killed_dir}"], nprocs=1)
    first = os.path.join(killed_dir, "shards", "shard-00000.json")
    deadline = time.time() + 300
    while not os.path.exists(first) and procs[0][0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_ranks(procs)
    assert os.path.exists(first)
    assert json.load(open(os.path.join(killed_dir, "manifest.json")))["status"] == "incomplete"
    assert len(_shard_hashes(killed_dir)) < 3
    capsys.readouterr()
    precompute.run(build_config(cfg.to_dict(), [f"teacher.output_dir={killed_dir}"]))
    assert "reused" in capsys.readouterr().out and _shard_hashes(killed_dir) == one


def test_restart_rewrites_a_corrupted_shard(tmp_path, tiny_store):
    store = str(tmp_path / "copy")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    victim = os.path.join(store, "shards", "shard-00001.arrow")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    assert any("sha256" in p for p in ts.verify_store(store)[1])
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store})
    summary = precompute.run(cfg)
    assert summary["shards_reused"] == 2 and summary["shards_computed"] == 1
    assert _shard_hashes(store) == _shard_hashes(tiny_store.teacher.output_dir)


def test_rerun_throughput_counts_the_shards_it_computed(tmp_path, tiny_store):
    """Shard 0 (5 examples) is recomputed, shards 1 and 2 (5 and 2) are reused: the summary's counts
    and throughput are those of shard 0, not of the last shards in the list."""
    store = str(tmp_path / "copy")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    os.remove(os.path.join(store, "shards", "shard-00000.arrow"))
    manifest = ts.read_manifest(store)
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store})
    summary = precompute.run(cfg)
    assert summary["shards_computed"] == 1 and summary["shards_reused"] == 2
    assert summary["examples_computed"] == manifest["shards"][0]["rows"] == 5
    assert summary["tokens_computed"] == manifest["shards"][0]["tokens"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_computed"] / summary["elapsed_s"])


def test_rerun_on_a_complete_store_changes_nothing_on_disk(tmp_path, tiny_store):
    store = str(tmp_path / "copy")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    before = {p: (os.path.getmtime(p), open(p, "rb").read()) for p in glob.glob(os.path.join(store, "**"), recursive=True)
              if os.path.isfile(p)}
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": store})
    summary = precompute.run(cfg)
    assert summary["shards_computed"] == 0 and summary["examples"] == 12
    after = {p: (os.path.getmtime(p), open(p, "rb").read()) for p in before}
    assert after == before


def test_a_hub_models_fingerprint_names_the_commit_its_revision_resolved_to(tmp_path, monkeypatch):
    """A branch moves: a store made from last month's main must not pass for this month's. Offline, from a Hugging
    Face cache laid out as the hub writes it (refs/main -> snapshots/<commit>)."""
    from huggingface_hub import constants
    from selfaug.config import ModelConfig
    from selfaug.models import ModelError, model_fingerprint
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fp = lambda **kw: model_fingerprint(ModelConfig(name_or_path="org/tiny", **kw))["content_hash"]
    (repo / "refs" / "main").write_text("a" * 40)
    last_month = fp()
    (repo / "refs" / "main").write_text("b" * 40)
    assert last_month == "hub:org/tiny@" + "a" * 40 and fp() == "hub:org/tiny@" + "b" * 40
    assert fp(revision="c" * 40) == "hub:org/tiny@" + "c" * 40  # a commit is its own answer
    # the weight files' content hashes are the Hub's own: an LFS file's blob in the cache is named by its sha256
    (repo / "blobs").mkdir()
    (repo / "blobs" / ("f" * 64)).write_bytes(b"weights")
    (repo / "snapshots" / ("b" * 40) / "model.safetensors").symlink_to(repo / "blobs" / ("f" * 64))
    assert model_fingerprint(ModelConfig(name_or_path="org/tiny"))["files"] == {"model.safetensors": "sha256:" + "f" * 64}
    with pytest.raises(ModelError, match="model.name_or_path=org/absent: the revision main cannot be resolved"):
        model_fingerprint(ModelConfig(name_or_path="org/absent"))


def test_stage_1_builds_no_kv_cache(tmp_path, monkeypatch):
    """Counted: transformers 5 allocates a KV cache on every forward unless told not to (~8.6 GB for a 64K-token
    batch of an 8B model); stage 1's forward never generates, so it builds none."""
    from transformers import cache_utils
    built = []
    real = cache_utils.DynamicCache.__init__
    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    from selfaug import precompute
    precompute.run(tiny_config(str(tmp_path)))
    assert built == []
    from selfaug.models import load_model
    load_model("builtin:tiny-llama")(input_ids=torch.tensor([[1, 2, 3]]))  # the instrument sees a default forward
    assert built == [1]


TRACE_CHECK = """
import deepspeed, torch
from selfaug import dist
from selfaug.models import TINY_LLAMA, load_model
from selfaug.precompute import teacher_signal
dist.ensure_env()
deepspeed.init_distributed(dist_backend="gloo")
conf = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine = deepspeed.initialize(model=load_model(TINY_LLAMA, torch.float32, ds_config=conf), config=conf)[0]
coordinator = engine.optimizer.get_param_coordinator()
ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
rows_b, rows_t = torch.tensor([0, 1, 1]), torch.tensor([3, 5, 15])
got = []
for _ in range(3):
    got.append(teacher_signal(engine.module, ids, torch.ones_like(ids), rows_b, rows_t,
                              lambda logp, rows: {"logp": logp}, chunk_rows=2)["logp"])
    assert not coordinator.is_invalid_trace()
assert coordinator.is_complete_trace()
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())), torch.no_grad():
    own = torch.log_softmax(engine.module(input_ids=ids).logits.float(), -1)[rows_b, rows_t]
assert all(torch.allclose(g, own, atol=1e-5) for g in got)
print("trace complete")
"""


def test_a_partitioned_teacher_runs_inside_the_forward_deepspeed_traces():
    """Stage 1 under ZeRO-3 calls the model's own forward (its head on one position) and takes the signal in a
    pre-hook of the head: DeepSpeed's coordinator completes its trace after the first batch, so later batches
    prefetch. The body called on its own, as before, left the trace invalid: every gather synchronous. (In a
    process of its own: a ZeRO-3 inference engine leaves DeepSpeed's hooks on the model classes.)"""
    import subprocess
    import sys

    from conftest import ROOT, clean_env
    from selfaug.dist import free_port
    done = subprocess.run([sys.executable, "-c", TRACE_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=str(free_port())))
    assert done.returncode == 0 and "trace complete" in done.stdout, done.stderr[-3000:]


def test_a_model_whose_forward_cannot_keep_one_position_gets_the_same_signal_from_its_body():
    """A forward without `logits_to_keep` (as some remote-code models have) would make (B, T, V) logits: stage 1
    runs the body alone and applies the head to the kept rows, with the same values."""
    from transformers import LlamaForCausalLM

    from selfaug.models import tiny_llama_config
    from selfaug.precompute import teacher_signal

    class WholeLogits(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    model = WholeLogits(tiny_llama_config()).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    rows_b, rows_t = torch.tensor([0, 1]), torch.tensor([4, 11])
    got = teacher_signal(model, ids, torch.ones_like(ids), rows_b, rows_t, lambda logp, rows: {"logp": logp}, 8)
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[rows_b, rows_t]
    assert torch.allclose(got["logp"], own, atol=1e-5)
