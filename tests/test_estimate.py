"""`selfaug estimate` (docs/design.md, "Command line"): the store's size against a store actually written, the
steps and tokens against a run's plan, and the memory terms against the memory plan's formulas."""
import os

import pytest

from conftest import tiny_config
from selfaug import estimate, precompute, store


@pytest.mark.parametrize("signal", ["topk", "sampled"])
def test_the_estimated_store_size_is_within_5_percent_of_the_written_store(tmp_path, signal):
    extra = {"signal": "sampled", "samples": 16} if signal == "sampled" else {"value_dtype": "float32"}
    cfg = tiny_config(str(tmp_path), teacher=extra)
    got = estimate.run(cfg, gpus=1)
    precompute.run(cfg)
    written = store.read_manifest(cfg.teacher.output_dir)["totals"]
    assert got["examples"] == written["examples"] and got["positions"] == written["positions"]
    assert got["tokens"] == written["tokens"]
    if signal == "topk":
        assert abs(got["store_bytes"] / written["bytes"] - 1) < 0.05, (got["store_bytes"], written["bytes"])
    else:  # N unique ids per position, an upper bound of what the draws keep
        assert got["store_is_upper_bound"] and written["bytes"] <= got["store_bytes"] * 1.05


def test_steps_tokens_and_the_memory_terms_follow_the_plan(tmp_path):
    cfg = tiny_config(str(tmp_path), train={"micro_batch_size": 2, "gradient_accumulation_steps": 3})
    e = estimate.run(cfg, gpus=2)
    assert e["global_batch"] == 12 and e["steps_per_epoch"] == 12 // 12
    s, m = e["model"], e["stage2_bytes_per_gpu"]
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 of 4 heads); the MLP; two norms
    assert s["params"] == 49152 * 64 * 2 + 2 * layer + 64  # tiny-llama: untied head, 2 layers, the final norm
    assert m["weights"] == 2 * s["params"] and m["zero3_working_set"] == 0  # ZeRO-2: whole weights, bf16
    full = estimate.memory({**s, "trainable": s["params"], "head_trains": True}, cfg.train, 3, 8, 4096, 2, 4, 0)
    assert full["weights"] == 2 * s["params"] / 8  # nothing kept whole (persistence 0): the plan's formula
    assert full["trainable_state"] == pytest.approx(s["params"] * 16 / 8)  # fp32 grads, fp32 master, Adam: /8
    assert full["weights"] + full["trainable_state"] == pytest.approx(18 * s["params"] / 8)  # the plan's 18P/8
    assert estimate._zero_plan("ds_configs/zero3.json", 2) == (3, 4, 1e6, 2e9)  # shipped: fp32 accumulation
    # the layers ZeRO-3 keeps gathered at the forward/backward turn (stage3_max_reuse_distance): 8B's 218M-parameter
    # layers within 2e9 elements, 70B's 856M ones two at least; a trained head in the trace shortens the reach
    llama8 = {"head": 525_336_576, "head_trains": False, "layer": 218_112_000, "layers": 32}
    assert estimate.zero3_layers_kept(llama8, 2e9) == 5
    assert estimate.zero3_layers_kept({**llama8, "head_trains": True}, 2e9) == 4
    assert estimate.zero3_layers_kept({"head": 1.05e9, "head_trains": False, "layer": 856_000_000, "layers": 80}, 2e9) == 2
    assert estimate._zero_plan("ds_configs/zero0.json", 2)[:2] == (0, 2)
    # ZeRO-3 keeps parameters below the persistence threshold whole on every rank: LoRA's A and B and the norms
    lora = estimate.memory(s, cfg.train, 3, 8, 4096, 2, 4, 1e6)
    whole = sum(n for n in s["small"] if n < 1e6)
    assert whole >= s["trainable"] and lora["weights"] == pytest.approx(2 * s["params"] / 8 + 2 * whole * 7 / 8)
