"""A tiny smoke of every benchmark (not a timed test: the figures come from `selfaug bench`)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env, tiny_config, write_recipe
from selfaug import store, train
from selfaug.config import build_config


GROUPS = {  # every section, in groups that run side by side (pytest -n): each group is one `selfaug bench`
    "steps": "step,hf,loss", "stage1": "precompute,storage,fidelity,long,data", "data": "packing,budget,positions",
    "cluster": "scale,open,reader,checkpoint", "overlap": "prefetch", "drift": "drift",
    "gpu": "gpu"}  # launch.sh gpu-check, here on the CPU: the same code runs before a GPU ever sees it


def test_the_groups_cover_every_section():
    from selfaug.bench.command import SECTIONS
    assert sorted(",".join(GROUPS.values()).split(",")) == sorted(SECTIONS)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_benchmark_runs_and_reports(tmp_path, tiny_store, group):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 3}, eval={"runs": str(tmp_path / "run")})
    if group == "stage1":
        train.train(cfg)  # the fine-tuned run the fidelity benchmark compares against
    if group == "drift":  # an evaluation that has run: its base's responses are the drift texts
        from selfaug.eval import evaluate
        cfg = build_config(cfg.to_dict(), ["eval.max_ifeval_prompts=3", "eval.max_rag_examples=2",
                                           "eval.max_drift_prompts=3", "eval.max_new_tokens=6"])
        train.train(cfg)
        evaluate.run(cfg)
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    command = ["-m", "selfaug", "bench", "--config", recipe, "--smoke", "--only", GROUPS[group]]
    if group == "gpu":  # launch.sh gpu-check's own entry: its exit status is the verdict
        command = ["-m", "selfaug.bench.gpu", "--config", recipe, "--smoke"]
    out = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "bench.json")], cwd=ROOT,
                         capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.load(open(tmp_path / "bench.json"))
    assert set(GROUPS[group].split(",")) <= set(r)
    if group == "steps":
        assert set(r["step"]) == {"vanilla_lora", "offline", "online", "alpha0"}
        assert r["step"]["vanilla_lora"]["time_ratio"] == 1.0 and all(s["peak_bytes"] > 0 for s in r["step"].values())
        h = r["hf"]
        assert set(h["rows"]) == {"plain_trainer", "selfaug_trainer", "selfaug_train"}
        assert all(row["step_time_s"] > 0 and row["peak_bytes"] > 0 for row in h["rows"].values())
        assert h["step_time_s_vs_plain_trainer"] > 0 and "SelfAugTrainer / plain Trainer" in out.stdout
    if group == "steps":  # the head's loss keeps one bf16 head gradient only when the head trains, nothing without grad
        loss = r["loss"]
        assert loss["trained_head"]["largest_saved"] == [loss["vocab"], loss["hidden"]]
        assert loss["frozen_head"]["saved_bytes"] == loss["frozen_head"]["formula_bytes"] < loss["trained_head"]["saved_bytes"]
        assert loss["no_grad_saved_bytes"] == 0
    if group == "overlap":  # the same losses with and without the thread; the slow disk's wait is counted
        p = r["prefetch"]
        assert p["same_losses"] and len(p["rows"]) == 4 and all(0 <= row["wait_share"] < 1 for row in p["rows"])
        o = p["object_store"]  # the store from S3 (moto, the dev extra): the same losses, its download counted
        assert "error" not in o, o["error"]
        if "skipped" in o:
            pytest.skip(o["skipped"])
        assert o["same_losses_as_local_disk"] and o["pull_s"] > 0 and 0 <= o["wait_share"] < 1
        assert o["pulled_bytes"] >= sum(s["bytes"] for s in store.read_manifest(tiny_store.teacher.output_dir)["shards"])
        b = p["object_store_by_shards"]  # by shards: the same losses as that order from local disk, shards downloaded
        assert b["same_losses_as_local_disk"] and 0 <= b["wait_share"] < 1 and b["shards"]["downloaded"]
        assert b["pulled_bytes"] < o["pulled_bytes"]  # before step 1: the manifest and sidecars, no shard
    if group == "drift":  # eval's bucket KL at k = 1024 against the exact one (k = |V|): never above it
        d = r["drift"]
        assert d["k"] == 1024 and d["vocab"] == 49152 and d["texts"] == 3 and len(d["rows"]) == 1
        assert d["never_above_exact"] and 0 <= d["max_gap_share"] < 1 and d["rows"][0]["exact"] > 0
    if group == "gpu":  # on the CPU: every check that needs no CUDA device ran against its bound, recorded as such
        g = r["gpu"]
        assert g["passed"] and not g["failures"] and g["attention_kernel"] == "emulated" and g["allow_emulated"]
        assert "attention kernel emulated" in out.stdout and "every bound holds" in out.stdout
        for name in ("attention", "accumulation", "bf16", "timeout"):
            assert g[name]["bounds"] and all(set(b) == {"figure", "bound", "rule", "passed"} and b["passed"]
                                             for b in g[name]["bounds"].values()), g[name]
            assert g[name]["attention_kernel"] in ("emulated", "sdpa")
        a = g["attention"]  # SmolLM2: one varlen row equals padding; a row's documents attending to each other do not
        bound = a["bounds"]["varlen_hidden"]["bound"]
        assert a["model"] == "builtin:smollm2-135m-instruct" and "emulated" in a["note"]
        assert a["varlen"]["hidden_rel_diff"] < bound < 100 * bound < a["multi_row"]["hidden_rel_diff"]
        assert a["varlen"]["head_grad_rel_diff"] < bound < 100 * bound < a["multi_row"]["head_grad_rel_diff"]
        assert g["accumulation"]["zero_stage"] == 3 and g["accumulation"]["dtype"] == "float32"  # bf16 on a GPU
        t = g["timeout"]  # read back from the group selfaug.dist made, not torch's default
        assert t["carried_s"] == t["asked_s"] == cfg.train.ddp_timeout != t["torch_default_s"] and t["world"] == 2
        assert g["measurements"]["precompute"]["ratio"] > 0 and "skipped" in g["memory"]
    if group == "stage1":
        assert r["precompute"]["ratio"] > 0 and r["storage"]["by_compression"]["none"]["bytes_per_entry"] > 2
        for row in r["fidelity"]["rows"]:
            assert 0 < row["bucket_ratio"] <= 1 + 1e-6 and -1 <= row["bucket_cos"] <= 1
        assert [row["tokens"] for row in r["long"]["rows"]] == [128, 256]
        for row in r["fidelity"]["sampled_rows"]:  # the sampled estimate is unbiased: near the exact KL
            assert 0.5 < row["ratio"] < 1.5 and row["bytes_per_position"] > 0 and 1 <= row["unique_per_position"]
        assert "bucket/exact" in out.stdout
    if group == "data":
        assert r["packing"]["rows"]["packed"]["padding"] <= r["packing"]["rows"]["padded"]["padding"]
        q = {row["fraction"]: row for row in r["positions"]["rows"]}
        assert q[0.25]["bytes_ratio"] < 0.4 and q[0.25]["kl_positions_per_step"] < q[1.0]["kl_positions_per_step"]
        b = r["budget"]  # the same epoch cut by tokens: no micro-batch over the budget, fewer bytes saved
        assert b["tokens"]["tokens_max"] <= b["budget"] < b["count"]["tokens_max"]
        assert b["saved_ratio"] < 1 and b["tokens"]["micro_batches"] >= b["count"]["micro_batches"]
        assert "largest activation x" in out.stdout
    if group == "cluster":
        assert r["scale"] and r["open"] and r["reader"]["rows"]
        c = r["checkpoint"]["rows"][0]  # one rank's save: its files hold its fp32 weights and Adam's two moments
        params = r["checkpoint"]["trainable_parameters"]
        assert c["world"] == 1 and c["gathered_bytes_max"] == 0 and c["seconds_max"] > 0
        assert 12 * params <= c["file_bytes_max"] < 13 * params and "x world / 1 rank" in out.stdout


def test_saved_bytes_counts_what_backward_keeps_and_not_the_parameters():
    import torch
    from selfaug.bench.worker import saved_bytes
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(10, 64, requires_grad=True)
    # x @ w saves x (10x64) and w (a parameter: left out); tanh saves its output (10x32)
    assert saved_bytes(lambda: torch.tanh(x @ w).sum(), [w]) == 4 * (10 * 64 + 10 * 32)
    assert saved_bytes(lambda: torch.tanh(x @ w).sum(), []) == 4 * (10 * 64 + 64 * 32 + 10 * 32)


def test_signal_bytes_use_4_byte_ids_over_65536_tokens():
    """The fidelity benchmark sizes each signal with the production code at the model's id dtype: a
    vocabulary over 65,536 tokens (Llama-3, Qwen2.5) stores 4-byte ids."""
    import numpy as np
    import torch
    from selfaug import store
    from selfaug.bench.worker import signal_rows
    from selfaug.data import Example
    vocab, positions, k = 70_000, 40, 8
    assert store.id_dtype_for(vocab) == "uint32" and store.id_dtype_for(65_536) == "uint16"
    logp = torch.log_softmax(torch.randn(positions, vocab, generator=torch.Generator().manual_seed(0)) * 3, -1)
    example = Example(0, list(range(positions + 5)), positions)
    wide, narrow = store.TopK(k, "uint32"), store.TopK(k, "uint16")
    rows = signal_rows(wide, logp, example)
    assert rows["topk_ids"].dtype == np.uint32 and rows["topk_ids"].max() > 65_535  # ids past 16 bits survive
    extra = wide.bytes_per_position(rows) - narrow.bytes_per_position(signal_rows(narrow, logp, example))
    assert abs(extra - 2 * k) < 0.5  # 2 more bytes for each of the k ids
    sampled = signal_rows(store.Sampled(16, 0, "uint32"), logp, example)
    assert sampled["sample_ids"].dtype == np.uint32 and sampled["sample_counts"].sum() == 16 * positions
