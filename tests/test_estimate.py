"""`selfaug estimate` (docs/design.md, "Command line"): the store's size against a store actually written, the
steps and tokens against a run's plan, and the memory terms against the memory plan's formulas."""
import os

import pytest

from conftest import ROOT, tiny_config
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
    assert estimate._zero_plan("ds_configs/zero3.json", 2) == (3, 4, 1e6, 2e9)  # shipped: fp32 accumulation, 2e9 live
    llama8 = {"params": 8.03e9, "head": 525_336_576, "layer_largest": 14336 * 4096}  # the MLP's 14336 x 4096
    assert estimate.zero3_gathered(llama8, 2e9) == 2e9 + 14336 * 4096 + 525_336_576
    assert estimate.zero3_gathered({**llama8, "params": 1e9}, 2e9) == 1e9  # the whole model at most
    assert estimate._zero_plan("ds_configs/zero0.json", 2)[:2] == (0, 2)
    # ZeRO-3 keeps parameters below the persistence threshold whole on every rank: LoRA's A and B and the norms
    lora = estimate.memory(s, cfg.train, 3, 8, 4096, 2, 4, 1e6)
    whole = sum(n for n in s["small"] if n < 1e6)
    assert whole >= s["trainable"] and lora["weights"] == pytest.approx(2 * s["params"] / 8 + 2 * whole * 7 / 8)


@pytest.mark.parametrize("real_layer,head_ratio", [(218_112_000, 2.41), (856_000_000, 1.23)], ids=["8B", "70B"])
@pytest.mark.parametrize("trains", [True, False], ids=["trained-head", "frozen-head"])
def test_zero3_gathers_at_most_the_estimated_working_set(real_layer, head_ratio, trains):
    """The ZeRO-3 working set counted with DeepSpeed itself: an 8-layer model whose layer, head and ZeRO-3 limits
    keep the ratios of Llama-3-8B (218M-parameter layers, head 2.41 layers) or 70B (856M, 1.23) under the shipped
    limits (stage3_max_live_parameters 2e9, prefetch bucket 5e7), trained with gradient checkpointing and the loss
    on the head in a forward hook, as selfaug's is (a trained head registered to the model, a frozen one under
    GatheredParameters). At every fetch of ZeRO-3's coordinator and in the loss, the parameters available on the
    rank are summed: their peak lies between 0.85 and 1 times `zero3_gathered`."""
    import contextlib

    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfaug import dist
    hidden, inter = 64, 224
    layer = 2 * hidden * hidden + 2 * hidden * 16 + 3 * hidden * inter  # q, o; k, v (one head of 16); the MLP
    vocab, max_live = int(head_ratio * layer / hidden), int(2e9 / real_layer * layer)
    zero = {"stage": 3, "stage3_prefetch_bucket_size": int(5e7 / real_layer * layer), "stage3_param_persistence_threshold": 200,
            "stage3_max_live_parameters": max_live, "stage3_max_reuse_distance": max_live}
    conf = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
            "zero_optimization": zero}
    dist.ensure_env()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=conf):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=16, num_hidden_layers=8, vocab_size=vocab,
                                             tie_word_embeddings=False))
    head = model.lm_head.weight
    head.requires_grad_(trains)
    model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(model=model, config=conf,
                                      optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    if trains:
        deepspeed.zero.register_external_parameter(engine.module, head)
    params, peak, seen = list(engine.module.parameters()), [0], {}

    def count():
        peak[0] = max(peak[0], sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))

    def loss(module, args, out):
        with contextlib.nullcontext() if trains else deepspeed.zero.GatheredParameters([head]):
            count()
            out["loss"] = (seen.pop("h") @ head.t()).float().logsumexp(-1).mean()
        return out

    coordinator = type(engine.optimizer.parameter_offload.get_param_coordinator())
    fetch = coordinator.fetch_sub_module

    def counted_fetch(self, *args, **kwargs):
        fetch(self, *args, **kwargs)
        count()

    engine.module.model.register_forward_hook(lambda module, args, out: seen.update(h=out.last_hidden_state))
    engine.module.register_forward_hook(loss, prepend=True)
    coordinator.fetch_sub_module = counted_fetch
    try:
        ids = torch.randint(0, vocab, (1, 32))
        for _ in range(2):
            engine.backward(engine(input_ids=ids, logits_to_keep=1, use_cache=False)["loss"])
            engine.step()
    finally:
        coordinator.fetch_sub_module = fetch
    shape = {"params": sum(p.ds_numel for p in params), "head": vocab * hidden, "layer_largest": hidden * inter}
    assert 0.85 <= peak[0] / estimate.zero3_gathered(shape, max_live) <= 1, (peak[0] / layer, max_live / layer)


def test_the_70b_recipe_spreads_its_evaluation_and_estimate_plans_stage_3_without_data(capsys):
    """Stage 3 of the 70B recipe: 141 GB of bf16 weights do not fit one 80 GB GPU, so the recipe sets
    eval.device_map: auto, and `selfaug estimate` (here without data: --seq-len, --examples) prints both figures."""
    from selfaug.config import load_config
    cfg = load_config(os.path.join(ROOT, "recipes/scale/llama3-70b/recipe.yaml"))
    assert cfg.eval.device_map == "auto"
    e = estimate.run(cfg, gpus=8, seq_len=4096, examples=64, gpu_bytes=80e9)
    t, s = e["stage3_bytes_per_gpu"], e["model"]
    assert s["params"] == 70_553_706_496 and t["whole"] == 2 * s["params"] and t["device_map"] == t["whole"] / 8
    assert not t["fits_one_gpu"] and "16.43 GiB with eval.device_map: auto over 8 GPUs" in capsys.readouterr().out
    assert e["tokens"] == 64 * 4096 and e["positions"] == 64 * 4096 and e["store_is_upper_bound"]
    # stage 1's activations count the MLP's gate, up and product (3 I a token; I = 28672 = 3.5 H at 70B), not 8 H
    teacher = 2 * s["params"] / 8 + 2 * (s["head"] + s["layer"])
    activations = e["stage1_bytes_per_gpu"] - teacher - 1024 * s["vocab"] * 4
    assert activations == 16384 * 2 * (2 * 8192 + 3 * 28672) and activations > 16384 * 2 * 8 * 8192


def test_a_model_larger_than_one_gpu_without_device_map_is_one_line(tmp_path):
    """The rule: a model fits one GPU when its weights take at most 90 % of the GPU's memory (the visible GPU's at
    eval's start; 80 GB in a plan where no GPU is visible)."""
    cfg = tiny_config(str(tmp_path))
    weights = 4 * estimate._shape(cfg.model, cfg.train)["params"]  # fp32
    assert estimate.stage3_problem(cfg, 4, weights / 0.89) is None
    line = estimate.stage3_problem(cfg, 4, weights / 0.95)
    assert "do not fit one GPU" in line and line.endswith("set eval.device_map: auto (the model spread over the node's GPUs)")
    assert estimate.stage3_problem(tiny_config(str(tmp_path), eval={"device_map": "auto"}), 4, weights / 0.95) is None


def test_zero3_offload_moves_the_state_and_partitions_to_the_host(tmp_path):
    """ds_configs/zero3_offload.json: the optimizer state and the parameters' partitions leave the GPU for the host;
    what leaves each GPU is what each rank holds on the host, times the ranks of a node."""
    on, off = (estimate.run(tiny_config(str(tmp_path), train={"adapter": "none", "deepspeed": os.path.join(ROOT, f"ds_configs/{n}.json")}),
                            gpus=4, seq_len=64, examples=16, gpus_per_node=4, gpu_bytes=80e9) for n in ("zero3", "zero3_offload"))
    assert estimate.offload_plan("ds_configs/zero3_offload.json") == {"optimizer": True, "params": True}
    assert estimate.offload_plan("ds_configs/zero3.json") == {"optimizer": False, "params": False}
    a, b = on["stage2_bytes_per_gpu"], off["stage2_bytes_per_gpu"]
    assert b["trainable_state"] == 0 and a["trainable_state"] == pytest.approx(on["model"]["trainable"] * 16 / 4)
    assert b["weights"] < a["weights"] and a["host_per_rank"] == 0 and on["host_bytes_per_node"] == 0
    moved = a["trainable_state"] + a["weights"] - b["weights"]
    assert b["host_per_rank"] == pytest.approx(moved) and off["host_bytes_per_node"] == pytest.approx(4 * moved)


def test_estimate_runs_from_the_model_and_sizes_before_the_data_exists(capsys, tmp_path, monkeypatch):
    from selfaug.cli import main
    monkeypatch.chdir(tmp_path)
    recipe = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert main(["estimate", "--config", recipe, "data.train=not_written_yet.jsonl", "--seq-len", "128",
                 "--examples", "40", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: not read; 40 examples of 128 tokens (--examples, --seq-len), 5,120 tokens, at most "
                          "5,120 KL positions") and "steps: 5 per epoch" in out, out
    assert main(["estimate", "--config", recipe, "--seq-len", "128"]) == 2
    assert "needs both --seq-len N and --examples M" in capsys.readouterr().err
