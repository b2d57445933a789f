"""Stage 2 on the DeepSpeed engine (CPU, gloo): the loss normalization, alpha = 0 as plain LoRA,
offline k = |V| as online, ZeRO-2/3 with 2 processes, resume, and refusal of mismatched stores."""
import json
import math
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, read_metrics, tiny_config, write_recipe
from selfaug import precompute
from selfaug import store as ts
from selfaug import train
from selfaug.config import build_config
from selfaug.loss import shifted_labels
from selfaug.models import load_model, load_tokenizer
from selfaug.train.batches import StepSampler, collate, to_device


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "final", "adapter_model.safetensors"))


def _train(cfg):
    out = train.train(cfg)
    return _adapter(out), read_metrics(out)


def _close(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for key in a:
        diff = (a[key].float() - b[key].float()).abs().max().item()
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=rtol), (key, diff, b[key].abs().max().item())


def _cfg(tmp, store_cfg, **sections):
    sections.setdefault("teacher", {})
    sections["teacher"] = {"value_dtype": "float32", "output_dir": store_cfg.teacher.output_dir, **sections["teacher"]}
    return tiny_config(str(tmp), **sections)


def test_kl_is_zero_at_step_0(tmp_path, tiny_store):
    _, metrics = _train(_cfg(tmp_path, tiny_store, train={"max_steps": 1, "alpha": 0.5}))
    assert metrics[0]["kl"] < 1e-6 and metrics[0]["kl_positions"] > 0 and metrics[0]["nll"] > 5


def test_alpha_0_equals_plain_lora_fine_tuning(tmp_path, tiny_store):
    from peft import get_peft_model, get_peft_model_state_dict
    cfg = _cfg(tmp_path, tiny_store, train={"alpha": 0.0, "max_steps": 3, "micro_batch_size": 3, "warmup_steps": 1,
                                            "max_grad_norm": 0.5})
    got, logged = _train(cfg)
    # the plain reference: peft + torch AdamW + HF logits and mean cross-entropy, no DeepSpeed
    tc = cfg.train
    model = load_model("builtin:tiny-llama").requires_grad_(False)
    torch.manual_seed(tc.seed)
    model = get_peft_model(model, train.lora_config(tc))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_factor(s, tc, tc.max_steps))
    store = ts.TeacherStore(tiny_store.teacher.output_dir)
    tok = load_tokenizer("builtin:tiny-llama")
    sampler = StepSampler(len(store), tc.micro_batch_size, 1, 1, tc.seed)
    norms = []
    for step in range(tc.max_steps):
        rows = [store.example(int(i)) for i in sampler.global_batch(step)]
        b = to_device(collate(rows, tok.pad_token_id), "cpu")
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = shifted_labels(b["input_ids"], torch.tensor([r["prompt_len"] for r in rows]),
                                torch.tensor([len(r["input_ids"]) for r in rows]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)))  # the norm before clipping
        opt.step(), sched.step(), opt.zero_grad()
    ref = {k: v for k, v in get_peft_model_state_dict(model).items()}
    assert [row["grad_norm"] for row in logged] == pytest.approx(norms, rel=1e-4)  # DeepSpeed's, logged per step
    # Adam's update of lora_A from near-zero gradients amplifies float noise: 1e-4 of values ~0.1
    _close(got, ref, atol=1e-4, rtol=1e-3)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # it did train


SGD = {"optim": "sgd", "learning_rate": 2.0, "max_grad_norm": 1e9}  # SGD: the update is as large as the gradient


def test_grad_accum_1xB_equals_2xB_over_2(tmp_path, tiny_store):
    a, ma = _train(_cfg(tmp_path / "a", tiny_store, train={**SGD, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2}))
    b, mb = _train(_cfg(tmp_path / "b", tiny_store, train={**SGD, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2}))
    _close(a, b, atol=1e-6)
    assert ma[-1]["kl"] > 0 and abs(ma[-1]["loss"] - mb[-1]["loss"]) < 1e-5


def test_offline_with_k_equal_vocab_trains_like_online(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
            for w in ("one", "two", "three", "four")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"data": {"train": str(path)}, "teacher": {"k": 49152, "value_dtype": "float32", "shard_size": 4}}
    cfg = tiny_config(str(tmp_path), **common, train={**SGD, "alpha": 1.0, "max_steps": 3})
    precompute.run(cfg)
    off, m_off = _train(cfg)
    cfg_on = tiny_config(str(tmp_path), **common, train={**SGD, "alpha": 1.0, "max_steps": 3,
                                                          "teacher_mode": "online", "output_dir": str(tmp_path / "on")})
    on, m_on = _train(cfg_on)
    assert m_off[-1]["kl"] > 1e-4
    for x, y in zip(m_off, m_on):
        assert abs(x["kl"] - y["kl"]) < 1e-6 * max(1, y["kl"]) + 1e-7 and abs(x["nll"] - y["nll"]) < 1e-5
    _close(off, on, atol=1e-5)


def test_mismatched_or_damaged_store_is_refused_before_training(tmp_path, tiny_store):
    def refused(cfg, match):
        with pytest.raises(ts.StoreError, match=match):
            train.setup(cfg)
    refused(_cfg(tmp_path, tiny_store, teacher={"k": 4}), r"k \(store: 8, recipe: 4\)")
    refused(_cfg(tmp_path, tiny_store, data={"builtin_seed": 7}), r"data\.sha256")
    store = str(tmp_path / "store")
    shutil.copytree(tiny_store.teacher.output_dir, store)
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    manifest["settings"]["tokenizer"]["vocab_sha256"] = "another-tokenizer"
    json.dump(manifest, open(os.path.join(store, "manifest.json"), "w"))
    refused(_cfg(tmp_path, tiny_store, teacher={"output_dir": store}), r"tokenizer\.vocab_sha256")
    shutil.rmtree(store)
    shutil.copytree(tiny_store.teacher.output_dir, store)
    victim = os.path.join(store, "shards", "shard-00001.arrow")
    data = bytearray(open(victim, "rb").read())
    data[100] ^= 1
    open(victim, "wb").write(bytes(data))
    refused(_cfg(tmp_path, tiny_store, teacher={"output_dir": store}), r"shard-00001\.arrow does not match its sha256")
    os.remove(victim)
    refused(_cfg(tmp_path, tiny_store, teacher={"output_dir": store}), r"shard-00001\.arrow is missing")


def _strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def test_two_process_zero3_train_save_and_resume(tmp_path, tiny_store):
    """Two ranks on ZeRO-3 stopped after 2 of 4 steps and resumed on two (DeepSpeed's own files), against one
    process accumulating the same 8 examples over 4 micro-batches: the same updates, so the loss is
    normalized by the whole step's tokens across ranks. (Two ranks on ZeRO-2, and resumes at another world
    size: train/test_cluster.py, train/test_batch_tokens.py, train/test_preemption.py.)"""
    from peft import PeftModel
    base = {**SGD, "max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "alpha": 0.5}
    one, one_metrics = _train(_cfg(tmp_path, tiny_store, train={**base, "gradient_accumulation_steps": 4,
                                                                "output_dir": str(tmp_path / "one")}))
    cfg = _cfg(tmp_path, tiny_store, train={**base, "deepspeed": "ds_configs/zero3.json",
                                            "output_dir": str(tmp_path / "z3")})
    recipe = write_recipe(str(tmp_path / "z3.yaml"), cfg)
    launch("train", recipe, nprocs=2, env={"SELFAUG_STOP_AFTER": "2"})
    assert not os.path.exists(tmp_path / "z3" / "final") and len(read_metrics(tmp_path / "z3")) == 2
    out = launch("train", recipe, nprocs=2)
    assert "resumed from" in out.stdout + out.stderr and "(written on" not in out.stdout + out.stderr
    resumed = _strip_times(read_metrics(tmp_path / "z3"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, _strip_times(one_metrics)):
        # the KL (~4e-5 here) is second order in the parameters, whose sum order differs under ZeRO-3: abs 1e-7
        assert {k: a[k] for k in ("loss", "nll", "kl")} == pytest.approx({k: b[k] for k in ("loss", "nll", "kl")},
                                                                        rel=1e-5, abs=1e-7)
    _close(_adapter(tmp_path / "z3"), one, atol=1e-4, rtol=1e-3)  # ZeRO-3 takes the same steps (other sum order)
    # the saved adapter loads with peft on the base model and generates
    tok = load_tokenizer("builtin:tiny-llama")
    model = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), str(tmp_path / "z3" / "final"))
    ids = tok("Hello", return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_bf16_trains_with_fp32_master_weights_and_ends_near_the_fp32_run(tmp_path, tiny_store, zero):
    """model.dtype=bfloat16 turns DeepSpeed's bf16 section on, on a CPU as on a GPU: bf16 weights and activations,
    fp32 master weights, optimizer state and gradient accumulation. 6 SGD steps of 2 micro-batches (an update in
    proportion to the gradient, so that the comparison sees the gradients' precision) stay finite, within 2 % of the
    fp32 run's losses, and their LoRA B updates (B starts at 0) within 5 % of the fp32 run's (Frobenius norm of the
    difference over that of the update)."""
    import deepspeed
    keys = {**SGD, "learning_rate": 0.5, "max_steps": 6, "micro_batch_size": 1, "gradient_accumulation_steps": 2,
            "min_lr_ratio": 1.0, "deepspeed": os.path.join(ROOT, "ds_configs", f"{zero}.json")}
    got = {}
    for dtype in ("float32", "bfloat16"):
        got[dtype] = _train(_cfg(tmp_path / dtype, tiny_store, model={"dtype": dtype}, train=keys))
    (a32, m32), (a16, m16) = got["float32"], got["bfloat16"]
    for r32, r16 in zip(m32, m16):
        assert math.isfinite(r16["loss"]) and r16["loss"] == pytest.approx(r32["loss"], rel=0.02)
    for key in (k for k in a32 if "lora_B" in k):
        assert a32[key].norm() > 0 and (a16[key].float() - a32[key]).norm() <= 0.05 * a32[key].norm(), key
    assert any((a16[k].float() - a32[k].float()).abs().max() > 0 for k in a32)  # really another precision
    run = train.setup(_cfg(tmp_path / "setup", tiny_store, model={"dtype": "bfloat16"}, train=keys))
    engine = run.engine
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]  # the model's own weights (LoRA)
    assert engine.bfloat16_enabled() and {p.dtype for p in frozen} == {torch.bfloat16}
    assert deepspeed.utils.safe_get_full_fp32_param(trainable[0]).dtype == torch.float32
    # the shipped configs accumulate micro-batches' gradients in fp32 (data_types.grad_accum_dtype), not in bf16
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    run.stop.restore()


def test_float16_is_refused_in_one_line_before_the_model_loads(tmp_path, tiny_store):
    import json as _json
    with pytest.raises(train.TrainError, match="model.dtype=float16: the head's gradients are computed in the forward"):
        train.train(_cfg(tmp_path, tiny_store, model={"dtype": "float16"}))
    conf = _json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    conf["fp16"] = {"enabled": True}
    path = tmp_path / "fp16.json"
    path.write_text(_json.dumps(conf))
    with pytest.raises(train.TrainError, match="fp16.json enables fp16: selfaug computes the head's gradients"):
        train.train(_cfg(tmp_path, tiny_store, train={"deepspeed": str(path)}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _changed_in_place(model_dir, factor=100):
    """The model directory's last tensor (the final norm) scaled in place: the file keeps its name and size."""
    from safetensors.torch import load_file as load, save_file
    weights = load(model_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * factor  # a tiny random model is near uniform
    size = os.path.getsize(model_dir / "model.safetensors")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert os.path.getsize(model_dir / "model.safetensors") == size


def _saved_tiny(model_dir):
    from selfaug.models import load_model, load_tokenizer
    load_model("builtin:tiny-llama").save_pretrained(model_dir)
    load_tokenizer("builtin:tiny-llama").save_pretrained(model_dir)


def test_a_model_changed_in_place_is_refused_naming_the_file(tmp_path, capsys):
    """Every byte of a model directory is its identity: its last tensor changed (same size) is one line naming the
    file, for training on the store made from it, for its precompute's resume, for a LoRA run's resume on it, and
    for eval's kept scores (not reused)."""
    from selfaug.cli import main
    from selfaug.config import ModelConfig
    from selfaug.eval.evaluate import _weights
    from selfaug.models import model_fingerprint
    model_dir = tmp_path / "model"
    _saved_tiny(model_dir)
    cfg = tiny_config(str(tmp_path), model={"name_or_path": str(model_dir)}, train={"max_steps": 1, "save_steps": 1})
    precompute.run(cfg)
    lora = build_config(cfg.to_dict(), ["train.teacher_mode=none", "train.alpha=0", f"train.output_dir={tmp_path}/lora"])
    train.train(lora)
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    scored = _weights(cfg, str(tmp_path / "lora"))
    before = model_fingerprint(ModelConfig(name_or_path=str(model_dir)))
    _changed_in_place(model_dir)
    after = model_fingerprint(ModelConfig(name_or_path=str(model_dir)))
    assert after["files"]["config.json"] == before["files"]["config.json"] != after["files"]["model.safetensors"]
    for argv, match in ((["train", "--config", recipe], "model.files.model.safetensors (store: 'xxh3_128:"),
                        (["precompute", "--config", recipe], "model.files.model.safetensors (store: 'xxh3_128:"),
                        (["train", "--config", write_recipe(str(tmp_path / "l.yaml"), lora), "train.max_steps=2"],
                         "model_files (model.safetensors changed)")):
        assert main(argv) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("selfaug: error: ")]
        assert len(err) == 1 and match in err[0], err
    assert _weights(cfg, str(tmp_path / "lora")) != scored  # the adapter's base changed: its scores are not reused


def test_a_model_that_is_not_the_stores_teacher_is_refused_at_its_first_micro_batch(tmp_path):
    """Weights the store's settings cannot tell apart (here its manifest says the changed model is its teacher): the
    first micro-batch's KL stops the run before any update, with the option that starts elsewhere on purpose."""
    from selfaug.config import ModelConfig
    from selfaug.models import model_fingerprint
    model_dir = tmp_path / "model"
    _saved_tiny(model_dir)
    cfg = tiny_config(str(tmp_path), model={"name_or_path": str(model_dir)}, train={"max_steps": 1})
    precompute.run(cfg)
    _changed_in_place(model_dir)
    manifest = ts.read_manifest(cfg.teacher.output_dir)
    manifest["settings"]["model"].update(model_fingerprint(ModelConfig(name_or_path=str(model_dir))))
    ts.write_json_atomic(os.path.join(cfg.teacher.output_dir, "manifest.json"), manifest)
    with pytest.raises(ts.StoreError, match=r"not the teacher of store .* KL to the stored teacher is .* set "
                                            r"train.check_teacher=false if it starts elsewhere on purpose"):
        train.train(cfg)
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "metrics.jsonl"))
    out = train.train(build_config(cfg.to_dict(), ["train.check_teacher=false"]))
    assert read_metrics(out)[0]["kl"] > 0.01


def test_prefetched_micro_batches_train_exactly_as_made_on_the_step(tmp_path, tiny_store, monkeypatch):
    """train.prefetch: the micro-batches made ahead on a thread are the ones the step would make: the same losses
    and parameters, bit for bit; each step logs how long it waited for them; a failure on the thread is raised on
    the training thread, at the micro-batch that needed it, with no hang."""
    from selfaug.train import prefetch
    keys = {**SGD, "max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 2}
    got = {depth: _train(_cfg(tmp_path / str(depth), tiny_store, train={**keys, "prefetch": depth})) for depth in (0, 3)}
    (a0, m0), (a3, m3) = got[0], got[3]
    assert all(torch.equal(a0[k], a3[k]) for k in a0)
    assert [(r["nll"], r["kl"]) for r in m0] == [(r["nll"], r["kl"]) for r in m3]
    assert all(0 <= r["data_wait_s"] < r["step_time_s"] for r in m0 + m3)
    real = prefetch.host_batch
    calls = []

    def failing(run, indices):
        calls.append(1)
        if len(calls) == 5:  # step 3's first micro-batch
            raise OSError("a shard could not be read")
        return real(run, indices)
    monkeypatch.setattr(prefetch, "host_batch", failing)
    with pytest.raises(OSError, match="a shard could not be read"):
        train.train(_cfg(tmp_path / "failing", tiny_store, train={**keys, "prefetch": 2}))
    assert len(read_metrics(str(tmp_path / "failing" / "run"))) == 2


def test_an_alpha_0_run_measures_its_drift_every_n_steps_and_logs_no_kl_where_it_does_not(tmp_path, tiny_store):
    """train.monitor_kl_every with alpha = 0 and a store: the KL at step 1 (the teacher check: ~0) and every N
    steps, equal to an independent computation on the same step's positions (the model after the steps before
    it, against the stored rows); without the monitor, no kl and no kl_positions at all."""
    from peft import PeftModel
    from selfaug.loss import kl_sum
    keys = {**SGD, "alpha": 0.0, "max_steps": 3, "monitor_kl_every": 3, "micro_batch_size": 2, "min_lr_ratio": 1.0}
    _, rows = _train(_cfg(tmp_path / "mon", tiny_store, train=keys))
    assert [("kl" in r, "kl_positions" in r) for r in rows] == [(True, True), (False, False), (True, True)]
    assert abs(rows[0]["kl"]) < 1e-7 < 1e-6 < rows[2]["kl"]  # plain fine-tuning drifts
    two = train.train(_cfg(tmp_path / "two", tiny_store, train={**keys, "max_steps": 2}))  # the weights step 3 saw
    model = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), os.path.join(two, "final")).eval()
    store = ts.TeacherStore(tiny_store.teacher.output_dir)
    examples = [store.example(int(i)) for i in StepSampler(len(store), 2, 1, 1, 42).global_batch(2)]
    batch = to_device(collate(examples, load_tokenizer("builtin:tiny-llama").pad_token_id), "cpu")
    with torch.no_grad():
        hidden = model.base_model.model.model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).last_hidden_state
        s, n = kl_sum(hidden, model.base_model.model.lm_head.weight, None, batch["rows_b"], batch["rows_t"],
                      store.signal.teacher(examples).to_device("cpu"))
    assert rows[2]["kl_positions"] == n and rows[2]["kl"] == pytest.approx(s.item() / n, rel=1e-4)
    _, off = _train(_cfg(tmp_path / "off", tiny_store, train={**keys, "monitor_kl_every": 0}))
    assert all("kl" not in r and "kl_positions" not in r for r in off)


def test_the_stop_file_stops_every_rank_at_a_step_with_a_checkpoint(tmp_path, tiny_store):
    """<output_dir>/STOP (what launch.sh touches on a stop: it reaches ranks on other nodes, where no signal does)
    touched after the ranks started ends the run at the next step boundary with a checkpoint and Preempted (exit
    75), and is removed, so the run started again goes on to the uninterrupted run's parameters; each rank's status
    is kept in <output_dir>/.exit. A STOP file older than the run (left by an earlier launch) stops nothing."""
    from selfaug.train import Preempted

    def stop_file(cfg, age_s: float) -> str:
        os.makedirs(cfg.train.output_dir)
        path = os.path.join(cfg.train.output_dir, "STOP")
        open(path, "w").close()
        os.utime(path, (time.time() - age_s,) * 2)  # age_s < 0: as if touched while the run goes
        return path

    keys = {**SGD, "max_steps": 3, "min_lr_ratio": 1.0}
    whole_cfg = _cfg(tmp_path / "whole", tiny_store, train=keys)
    stale = stop_file(whole_cfg, 60)
    whole, _ = _train(whole_cfg)
    assert len(read_metrics(whole_cfg.train.output_dir)) == 3 and os.path.exists(stale)
    cfg = _cfg(tmp_path / "stopped", tiny_store, train=keys)
    path = stop_file(cfg, -60)
    with pytest.raises(Preempted) as stopped:
        train.train(cfg)
    assert stopped.value.step == 1 and not os.path.exists(path)
    assert open(os.path.join(cfg.train.output_dir, ".exit", "rank-0-of-1")).read() == "75\n"
    again = _adapter(train.train(cfg))
    _close(again, whole, atol=1e-6)


def test_by_shards_a_run_resumes_as_uninterrupted_and_a_resume_in_the_global_order_is_refused(tmp_path, tiny_store):
    keys = {"order": "shards", "max_steps": 3, "micro_batch_size": 2, "optim": "sgd", "learning_rate": 0.5}
    whole = train.train(_cfg(tmp_path, tiny_store, train={**keys, "output_dir": str(tmp_path / "whole")}))
    run = str(tmp_path / "resumed")
    train.train(_cfg(tmp_path, tiny_store, train={**keys, "output_dir": run}), stop_after=1)
    with pytest.raises(train.CheckpointError, match=r"another recipe: order \(checkpoint: \['shards', 1\], recipe: None"):
        train.train(_cfg(tmp_path, tiny_store, train={**keys, "order": "global", "output_dir": run}))
    train.train(_cfg(tmp_path, tiny_store, train={**keys, "output_dir": run}))
    a = load_file(os.path.join(whole, "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(run, "final", "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
