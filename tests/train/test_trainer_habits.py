"""The Trainer's habits: the learning rate of each train.lr_scheduler_type equal to transformers' `get_scheduler` of
that name (warmup by steps or by ratio), the gradient norm DeepSpeed computes logged per step, the NLL on data.eval
every train.eval_steps, and W&B online when `wandb login` stored a key."""
import math
import os

import pytest
import torch

from conftest import tiny_config
from selfaug.config import ConfigError, build_config
from selfaug.train import lr_factor

BASE = {"model": {"name_or_path": "x"}, "data": {"train": "y"}}


@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_with_min_lr", "constant_with_warmup"])
@pytest.mark.parametrize("warmup", [[], ["train.warmup_steps=3"], ["train.warmup_ratio=0.25"]])
def test_each_lr_schedule_is_transformers_own(kind, warmup):
    from transformers import get_scheduler
    total = 11
    tc = build_config(BASE, [f"train.lr_scheduler_type={kind}", f"train.max_steps={total}", "train.min_lr_ratio=0.2",
                             *warmup]).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warm = {"train.warmup_steps=3": 3, "train.warmup_ratio=0.25": math.ceil(0.25 * total)}.get(warmup[0] if warmup else "", 0)
    sched = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=total,
                          scheduler_specific_kwargs={"min_lr_rate": 0.2} if kind == "cosine_with_min_lr" else None)
    theirs = []
    for _ in range(total):
        theirs.append(sched.get_last_lr()[0])
        opt.step(), sched.step()
    ours = [lr_factor(s, tc, total) for s in range(total)]
    assert ours == pytest.approx(theirs, rel=0, abs=1e-12)


def test_the_default_schedule_is_cosine_to_min_lr_ratio_and_warmup_is_one_setting():
    tc = build_config(BASE, ["train.max_steps=10"]).train
    assert tc.lr_scheduler_type == "cosine_with_min_lr" and lr_factor(0, tc, 10) == 1.0
    assert lr_factor(10, tc, 10) == pytest.approx(tc.min_lr_ratio)
    with pytest.raises(ConfigError, match="train.warmup_steps=2 and train.warmup_ratio=0.1 both set the warmup"):
        build_config(BASE, ["train.warmup_steps=2", "train.warmup_ratio=0.1"])


def test_wandb_auto_is_online_with_the_key_wandb_login_stored(tmp_path, monkeypatch):
    from wandb.sdk.lib.wbauth import read_netrc_auth
    from selfaug.train.metrics import wandb_mode
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    tc = build_config(BASE).train
    assert tc.wandb_mode == "auto" and wandb_mode(tc) == "offline"  # no key anywhere
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")  # what `wandb login` writes
    netrc.chmod(0o600)
    assert read_netrc_auth(host="https://api.wandb.ai") == "a" * 40  # wandb itself finds the key there
    assert wandb_mode(tc) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another server is not this one's
    assert wandb_mode(tc) == "offline"


@pytest.mark.parametrize("cut", [{}, {"packing": True, "micro_batch_tokens": 512}])  # by count; by padded tokens
def test_eval_steps_log_the_held_out_nll_of_the_model_at_that_step(tmp_path, cut):
    from conftest import read_metrics
    from selfaug import train
    cfg = tiny_config(str(tmp_path), data={"builtin_eval_size": 7},  # 7 examples in micro-batches of 2: one short
                      train={"teacher_mode": "none", "alpha": 0, "max_steps": 3, "eval_steps": 2, "logging_steps": 5,
                             **cut})
    out = train.train(cfg)
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval_nll" in r] == [2, 3]  # every 2 steps and at the last, logged with it
    assert all(r["grad_norm"] > 0 for r in rows)  # ZeRO-2: DeepSpeed's norm, on every logged row
    # the plain reference: the final adapter on its base, HF logits, mean cross-entropy over the response tokens
    kept, total, count = _held_out_nll(out, cfg)
    assert len(kept) == 7 and rows[-1]["eval_tokens"] == count
    assert rows[-1]["eval_nll"] == pytest.approx(total / count, rel=1e-5)
    assert rows[0]["eval_nll"] != rows[-1]["eval_nll"]  # the model moved between the two


def test_eval_steps_without_held_out_data_is_one_line(tmp_path):
    from selfaug import train
    from selfaug.train.validation import EvalDataError
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    cfg = tiny_config(str(tmp_path), data={"train": str(path)}, train={"teacher_mode": "none", "alpha": 0,
                                                                      "eval_steps": 1})
    with pytest.raises(EvalDataError, match="train.eval_steps=1 .* data.eval is not set: set data.eval"):
        train.train(cfg)


@pytest.mark.slow
def test_eval_steps_and_save_hf_on_two_ranks_under_zero3(tmp_path):
    """2 ranks, ZeRO-3: the held-out examples split 3 / 2 (a padded forward on rank 1, or ZeRO-3's gathers hang), the
    sums all-reduced to the 1-process NLL of the final adapter; each kept checkpoint's hf/ is that step's adapter,
    gathered tensor by tensor; DeepSpeed's grad_norm on every row."""
    from safetensors.torch import load_file
    from conftest import ROOT, launch, read_metrics, write_recipe
    cfg = tiny_config(str(tmp_path), data={"builtin_eval_size": 5},
                      train={"teacher_mode": "none", "alpha": 0, "max_steps": 2, "eval_steps": 1, "save_steps": 1,
                             "save_hf": True, "save_total_limit": 1, "micro_batch_size": 2,
                             "deepspeed": os.path.join(ROOT, "ds_configs", "zero3.json")})
    launch("train", write_recipe(str(tmp_path / "r.yaml"), cfg), nprocs=2)
    out = cfg.train.output_dir
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval_nll" in r] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    from selfaug.train.retention import checkpoints
    assert checkpoints(os.path.join(out, "checkpoints")) == ["step-2"]
    hf, final = (load_file(os.path.join(d, "adapter_model.safetensors"))
                 for d in (os.path.join(out, "checkpoints", "step-2", "hf"), os.path.join(out, "final")))
    assert hf.keys() == final.keys() and all(torch.equal(hf[k], final[k]) for k in hf)
    kept, total, count = _held_out_nll(out, cfg)
    assert len(kept) == 5 and rows[-1]["eval_tokens"] == count
    assert rows[-1]["eval_nll"] == pytest.approx(total / count, rel=1e-5)


def _held_out_nll(out, cfg):
    """The plain reference: the final adapter on its base, HF logits, summed cross-entropy over the held-out
    examples' response tokens. (examples, NLL sum, token count)"""
    from peft import PeftModel

    from selfaug.data import BUILTIN_RAG_EVAL, load_examples
    from selfaug.models import load_model, load_tokenizer
    model = PeftModel.from_pretrained(load_model("builtin:tiny-llama"), os.path.join(out, "final")).eval()
    kept, _ = load_examples(BUILTIN_RAG_EVAL, load_tokenizer("builtin:tiny-llama"), cfg.data).examples()
    total = count = 0.0
    with torch.no_grad():
        for e in kept:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, e.prompt_len - 1:-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, e.prompt_len:], reduction="sum").item()
            count += len(e.input_ids) - e.prompt_len
    return kept, total, count
