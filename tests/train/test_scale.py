"""The large-model paths at a small scale (2 ranks, gloo): models created partitioned under ZeRO-3,
stage 1's partitioned teacher, a trainable lm_head under ZeRO-3, activation checkpointing, random-init
shapes, and their bad inputs."""
import glob
import json
import os
import time

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER, ROOT, kill_ranks, launch, read_metrics, spawn, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug import store as ts
from selfaug.config import ModelConfig
from selfaug.models import load_model
from selfaug.train.batches import to_device

INFERENCE = os.path.join(ROOT, "ds_configs", "zero3_inference.json")
SGD = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9}


def _random_dir(tmp, **shape):
    """A directory holding only a config.json: a tiny Llama with a tied head (like SmolLM2's)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, **shape}
    path = os.path.join(str(tmp), "shape")
    os.makedirs(path, exist_ok=True)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return path


def _held_partitioned(stdout):
    """Each of the 2 ranks held about half of the model from its creation on, never all of it."""
    for rank in (0, 1):
        line = [x for x in stdout.splitlines() if f"rank {rank} holds" in x]
        assert line, stdout[-3000:]
        local, total = (int(w.replace(",", "")) for w in line[0].split("holds ")[1].split(" parameters")[0].split(" of "))
        assert 0.4 < local / total < 0.6, line[0]


def _rows(store_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(store_dir, "shards", "*.arrow"))):
        with pa.memory_map(path) as src:
            for row in pa.ipc.open_stream(src).read_all().to_pylist():
                out[row["example_id"]] = row
    return out


def _same_store(a_dir, b_dir, tol):
    a, b = _rows(a_dir), _rows(b_dir)
    assert a.keys() == b.keys() and a
    for i in a:
        for col in ("input_ids", "prompt_len", "positions", "topk_ids"):
            assert a[i][col] == b[i][col], (i, col)
        assert torch.allclose(torch.tensor(a[i]["topk_logprobs"]), torch.tensor(b[i]["topk_logprobs"]), atol=tol, rtol=tol)
        assert torch.allclose(torch.tensor(a[i]["tail_logprob"]), torch.tensor(b[i]["tail_logprob"]), atol=tol, rtol=tol)


def test_zero3_partitioned_teacher_store_equals_one_process_and_resumes(tmp_path, tiny_store):
    """Stage 1 with the teacher partitioned over 2 ranks (3 chunks: rank 1 runs a dummy round)."""
    two = str(tmp_path / "z3")
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), teacher={
        "value_dtype": "float32", "output_dir": two, "deepspeed": INFERENCE}))
    out = launch("precompute", recipe, nprocs=2)
    _held_partitioned(out.stdout)
    _same_store(tiny_store.teacher.output_dir, two, 1e-5)  # fp32 values here; fp16 rounding is 1e-3
    manifest = ts.read_manifest(two)
    assert manifest["computed_with"] == {"teacher": "zero3-partitioned", "world_size": 2, "deepspeed": INFERENCE}
    # killed after its first shard, then resumed: still the same store
    killed = str(tmp_path / "killed")
    procs, port = spawn("precompute", recipe, [f"teacher.output_dir={killed}"], nprocs=2)
    first = os.path.join(killed, "shards", "shard-00000.json")
    deadline = time.time() + 300
    while not os.path.exists(first) and all(p.poll() is None for p, _, _ in procs) and time.time() < deadline:
        time.sleep(0.05)
    kill_ranks(procs)
    assert os.path.exists(first) and ts.read_manifest(killed)["status"] == "incomplete"
    out = launch("precompute", recipe, [f"teacher.output_dir={killed}"], nprocs=2)
    assert "reused" in out.stdout
    _same_store(tiny_store.teacher.output_dir, killed, 1e-5)


def test_zero3_full_fine_tuning_with_a_trainable_head_equals_zero2(tmp_path):
    """4 SGD steps, a tied head that trains: ZeRO-3 on 2 ranks (created partitioned, the head an external
    parameter of the loss, with activation checkpointing) ends where ZeRO-2 ends (one rank accumulating the
    same global batch of 4); final/ loads with transformers alone, and the log says how long ranks 1.. wait
    while rank 0 writes it."""
    from transformers import AutoModelForCausalLM
    model = {"name_or_path": _random_dir(tmp_path), "init": "random", "seed": 3}
    base = tiny_config(str(tmp_path), model=model, teacher={"value_dtype": "float32"})
    precompute.run(base)
    finals = {}
    for name, extra in (("z2", {"gradient_accumulation_steps": 2}), ("z3", {"deepspeed": os.path.join(ROOT, "ds_configs/zero3.json"),
                                                          "gradient_checkpointing": True})):
        cfg = tiny_config(str(tmp_path), model=model, teacher={"value_dtype": "float32"}, train={
            **SGD, "adapter": "none", "freeze_lm_head": False, "alpha": 0.5, "max_steps": 4, "micro_batch_size": 2,
            "output_dir": str(tmp_path / name), **extra})
        if name == "z3":
            out = launch("train", write_recipe(str(tmp_path / f"{name}.yaml"), cfg), nprocs=2).stdout
            _held_partitioned(out)
            assert (f"rank 0 writes {tmp_path / name / 'final'} (the model in Hugging Face form); the other ranks "
                    "wait at a barrier (up to train.ddp_timeout = 60 min)") in out, out[-2000:]
        else:
            train.train(cfg)
        finals[name] = AutoModelForCausalLM.from_pretrained(str(tmp_path / name / "final"))
    a, b = finals["z2"].state_dict(), finals["z3"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-5), (key, (a[key] - b[key]).abs().max())
    start = load_model(ModelConfig(**model), torch.float32)
    head0 = start.get_output_embeddings().weight
    assert (finals["z3"].get_output_embeddings().weight - head0).abs().max() > 1e-4  # the head trained
    ids = torch.tensor([[1, 5, 9]])
    assert finals["z3"].generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_parameters(tmp_path, tiny_store, method):
    got = {}
    for gc in (False, True):
        cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                          train={**SGD, "adapter": ADAPTER[method], "alpha": 0.5, "max_steps": 3, "gradient_checkpointing": gc,
                                 "output_dir": str(tmp_path / f"{method}-{gc}")})
        out = train.train(cfg)
        name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        got[gc] = (load_file(os.path.join(out, "final", name)), read_metrics(out))
    a, b = got[False][0], got[True][0]
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    assert got[True][1][-1]["kl"] > 0
    # and checkpointing was really on: the activations autograd keeps for backward shrink
    saved = {}
    for gc in (False, True):
        cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                          train={"adapter": ADAPTER[method], "gradient_checkpointing": gc, "output_dir": str(tmp_path / "s")})
        run = train.setup(cfg)
        rows = [run.source.examples.example(i) for i in range(2)]
        batch = to_device(run.source.batch(rows, run.tok.pad_token_id), run.device)
        total = [0]
        head = (49152, 64)  # the loss saves its closed-form lm_head gradient (full method): not an activation

        def pack(t):
            total[0] += 0 if tuple(t.shape) == head else t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run.engine(batch, 1.0, 1.0)
        saved[gc] = total[0]
    assert saved[True] < 0.5 * saved[False], saved


def test_scale_recipes_are_real_shapes_and_bad_inputs_get_one_line(tmp_path, capsys):
    from transformers import AutoConfig
    from selfaug.cli import main
    from selfaug.config import load_config
    expected = {"qwen2.5-7b": 7.6e9, "llama3-8b": 8.0e9, "llama3-70b": 70.6e9}
    for name, params in expected.items():
        cfg = load_config(os.path.join(ROOT, "recipes", "scale", name, "recipe.yaml"))
        assert cfg.model.init == "random" and os.path.samefile(cfg.model.name_or_path, os.path.join(ROOT, "recipes/scale", name))
        c = AutoConfig.from_pretrained(cfg.model.name_or_path)
        kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        n = c.num_hidden_layers * (2 * c.hidden_size ** 2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size) \
            + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        assert abs(n - params) / params < 0.01, (name, n)

    def one_line(overrides, match):
        recipe = write_recipe(str(tmp_path / "bad.yaml"), tiny_config(str(tmp_path)))
        assert main(["precompute", "--config", recipe, *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("selfaug: error: ") and match in err[0], err
    bad = _random_dir(tmp_path / "bad", model_type="no-such-model")
    one_line([f"model.name_or_path={bad}", "model.init=random"], "transformers cannot build a model")
    small = _random_dir(tmp_path / "small", vocab_size=1000)
    one_line([f"model.name_or_path={small}", "model.init=random"], "vocab_size=1000, smaller than the tokenizer's")
    one_line(["teacher.deepspeed=ds_configs/nope.json"], "teacher.deepspeed: file 'ds_configs/nope.json' not found")


def test_zero3_configs_keep_the_largest_matrix_and_the_head_of_every_scale_shape_live():
    """stage3_max_live_parameters and stage3_max_reuse_distance below one matrix make ZeRO-3 release and gather
    it again within a step; the head (gathered whole for the chunked loss) and a layer's largest matrix must fit
    together (docs/distributed.md: the arithmetic)."""
    import json as _json
    need = 0
    for name in ("qwen2.5-7b", "llama3-8b", "llama3-70b"):
        c = _json.load(open(os.path.join(ROOT, "recipes", "scale", name, "config.json")))
        head = c["vocab_size"] * c["hidden_size"]
        largest = max(c["hidden_size"] * c["intermediate_size"], c["hidden_size"] * c["hidden_size"])
        need = max(need, head + largest)
    assert need == 128256 * 8192 + 8192 * 28672  # Llama-3-70B: 1.05e9 + 0.235e9
    for path in ("zero3.json", "zero3_inference.json", "zero3_offload.json"):
        z = _json.load(open(os.path.join(ROOT, "ds_configs", path)))["zero_optimization"]
        assert z["stage3_max_live_parameters"] >= need and z["stage3_max_reuse_distance"] >= need, path


def test_a_frozen_zero3_head_is_gathered_for_the_forward_only_and_a_trained_one_is_external(tmp_path, tiny_store):
    """LoRA under ZeRO-3: the frozen head is not an external parameter of the objective (DeepSpeed would gather it
    again when backward starts and hold it through backward), and is gathered for the loss alone; a head that
    trains is external (its gradient is reduce-scattered). Both run a step."""
    for adapter, external in (("lora", False), ("none", True)):
        cfg = tiny_config(str(tmp_path / adapter), teacher={"value_dtype": "float32",
                                                            "output_dir": tiny_store.teacher.output_dir},
                          train={"adapter": adapter, "deepspeed": os.path.join(ROOT, "ds_configs/zero3.json")})
        run = train.setup(cfg)
        objective = run.engine.module
        head = objective.model.get_output_embeddings().weight
        assert any(p is head for _, p in objective.ds_external_parameters()) == external, adapter
        assert ("frozen_head" in objective.__dict__) == (not external)
        got = train.train_step(run, 0, train.step_coefficients(run, 0))
        assert torch.isfinite(got.sums).all()
        run.stop.restore()
