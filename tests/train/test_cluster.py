"""A cluster's ordinary life at a small scale (2 ranks, gloo): a store opened with 1/world of the checks
per rank, and resume at another world size with the same global batch (preemption: test_preemption.py)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER, ROOT, clean_env, launch, read_metrics, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug.train import checkpoint
from selfaug.dist import free_port

SGD = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9}


def _final(run_dir, method):
    return load_file(os.path.join(run_dir, "final", "adapter_model.safetensors" if method == "lora"
                                  else "model.safetensors"))


def _close(a, b, atol=1e-5):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-4), (
            key, (a[key].float() - b[key].float()).abs().max().item())


# ---- 1. the store opened on 2 ranks ----------------------------------------------------------------

def test_two_ranks_each_check_half_the_store_and_report_a_corrupt_shard_alike(tmp_path, tiny_store):
    store_dir = str(tmp_path / "store")
    shutil.copytree(tiny_store.teacher.output_dir, store_dir)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "helpers", "open_store.py"), store_dir, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]
    manifest = json.load(open(os.path.join(store_dir, "manifest.json")))
    n = len(manifest["shards"])  # 3 shards: rank 0 checks shards 0 and 2, rank 1 shard 1
    assert [r["shards"] for r in reports] == [list(range(0, n, 2)), list(range(1, n, 2))]
    assert sum(r["bytes_hashed"] for r in reports) == sum(s["bytes"] for s in manifest["shards"])
    assert all(r["bytes_hashed"] < 0.75 * sum(s["bytes"] for s in manifest["shards"]) for r in reports)
    assert sum(r["positions_checked"] for r in reports) == manifest["totals"]["positions"]
    assert all(r["examples"] == manifest["totals"]["examples"] for r in reports)  # each reads every example
    errors = [r["error"] for r in reports]
    assert errors[0] and errors[0] == errors[1] and "shard-00002.arrow does not match its sha256" in errors[0]


# ---- 2. resume at another world size ---------------------------------------------------------------

@pytest.fixture(scope="module")
def full_model_store(tmp_path_factory):
    """A random tiny Llama with a tied head that trains (full fine-tuning under ZeRO-3), and its store."""
    from test_scale import _random_dir
    tmp = tmp_path_factory.mktemp("fullstore")
    cfg = tiny_config(str(tmp), model={"name_or_path": _random_dir(tmp), "init": "random", "seed": 3},
                      teacher={"value_dtype": "float32"})
    precompute.run(cfg)
    return cfg


def _optimizer_files(step_dir):
    return [os.path.getsize(f) for f in sorted(glob.glob(os.path.join(step_dir, "*_optim_states.pt")))]


def _check_sharded(step_dir, method):
    """A checkpoint holds DeepSpeed's per-rank files and no whole copy of anything: no frozen parameter
    (a LoRA base), no file of the gathered state; `universal/` is the form a resume at another world
    size wrote, each trainable parameter in files of its own."""
    names = set(os.listdir(step_dir))
    assert names - {checkpoint.META, checkpoint.UNIVERSAL} == {
        f for f in names if f.endswith(("_model_states.pt", "_optim_states.pt")) or f.startswith("rng_rank")}
    model_states = [f for f in names if f.endswith("_model_states.pt")]
    for f in model_states:
        module = torch.load(os.path.join(step_dir, f), weights_only=False)["module"]
        assert method != "lora" or module and all("lora_" in k for k in module), sorted(module)[:3]
    universal = os.path.join(step_dir, checkpoint.UNIVERSAL)
    params = sorted(os.listdir(os.path.join(universal, "zero")))
    assert "optimizer_state.pt" in params and model_states[0] in os.listdir(universal)
    assert method != "lora" or all("lora_" in p for p in params if p != "optimizer_state.pt")
    assert all(os.listdir(os.path.join(universal, "zero", p)) == ["fp32.pt"]  # SGD: the value alone
               for p in params if p != "optimizer_state.pt")


# LoRA on ZeRO-2 from 2 ranks to 1 is every case of test_preemption.py: here it goes from 1 to 2, with
# alpha steered by a drift budget (the controller's state travels in the checkpoint)
CASES = {"lora-zero2": ("lora", "ds_configs/zero2.json", ("one-two",), {"drift_budget": 1e-7, "drift_horizon": 2.0}),
         "full-zero3": ("full", "ds_configs/zero3.json", ("two-one", "one-two"), {})}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_2_to_1_and_1_to_2_ranks_with_the_same_global_batch(tmp_path, tiny_store, full_model_store, case):
    """Global batch 4 = micro 2 x accum 1 x 2 ranks = micro 2 x accum 2 x 1 rank. 4 SGD steps: stopped after
    2 on one world size and finished on the other, the parameters equal an uninterrupted run's."""
    method, ds, directions, extra = CASES[case]
    base_cfg = tiny_store if method == "lora" else full_model_store
    model = {"name_or_path": base_cfg.model.name_or_path, "init": base_cfg.model.init, "seed": base_cfg.model.seed}

    def cfg(name, **train_keys):
        return tiny_config(str(tmp_path), model=model,
                           teacher={"value_dtype": "float32", "output_dir": base_cfg.teacher.output_dir},
                           train={**SGD, "adapter": ADAPTER[method], "freeze_lm_head": False, "alpha": 0.5, "max_steps": 4,
                                  "micro_batch_size": 2, "deepspeed": os.path.join(ROOT, ds),
                                  "output_dir": str(tmp_path / name), **extra, **train_keys})

    whole = train.train(cfg("whole", gradient_accumulation_steps=2))  # uninterrupted, 1 rank
    if "two-one" in directions:  # two ranks stop after step 2; one rank with accumulation 2 finishes
        two = cfg("two-one", gradient_accumulation_steps=1)
        launch("train", write_recipe(str(tmp_path / "two.yaml"), two), nprocs=2, env={"SELFAUG_STOP_AFTER": "2"})
        meta = json.load(open(tmp_path / "two-one" / "checkpoints" / "step-2" / checkpoint.META))
        assert (meta["world_size"], meta["grad_accum"], meta["global_batch"]) == (2, 1, 4)
        with pytest.raises(checkpoint.CheckpointError, match=r"global batch of 4 .* this run has 2 "
                                                             r".*train.gradient_accumulation_steps=2 keeps it"):
            train.train(cfg("two-one", gradient_accumulation_steps=1))
        train.train(cfg("two-one", gradient_accumulation_steps=2))
    # 1 -> 2
    train.train(cfg("one-two", gradient_accumulation_steps=2), stop_after=2)
    out = launch("train", write_recipe(str(tmp_path / "one.yaml"), cfg("one-two", gradient_accumulation_steps=1)),
                 nprocs=2)
    assert "written on 1 ranks, now 2: universal form in" in out.stdout + out.stderr
    for name in directions:  # DeepSpeed's files, each rank's own, and the universal form the resume wrote
        _check_sharded(tmp_path / name / "checkpoints" / "step-2", method)
    if "two-one" in directions:  # each of 2 ranks wrote half of what one rank writes
        one, two = (_optimizer_files(tmp_path / name / "checkpoints" / "step-2") for name in ("one-two", "two-one"))
        assert len(one) == 1 and len(two) == 2 and all(0.45 < b / one[0] < 0.55 for b in two), (one, two)
    reference = _final(whole, method)
    for name in directions:
        _close(_final(tmp_path / name, method), reference)
        for key in ("loss", "alpha"):
            assert [r[key] for r in read_metrics(tmp_path / name)] == pytest.approx(
                [r[key] for r in read_metrics(whole)], rel=1e-5)
    if extra:
        alphas = [r["alpha"] for r in read_metrics(whole)]
        assert alphas[-1] > alphas[0]


def test_a_checkpoint_of_another_recipe_is_refused_in_one_line(tmp_path, tiny_store):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={**SGD, "max_steps": 3})
    train.train(cfg, stop_after=1)
    other = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                        train={**SGD, "max_steps": 3, "lora_r": 4})
    with pytest.raises(checkpoint.CheckpointError, match=r"another recipe: lora \(checkpoint: \[16, "):
        train.train(other)
    # a checkpoint directory without selfaug's record (a save that never finished) is named, not loaded
    os.remove(os.path.join(cfg.train.output_dir, "checkpoints", "step-1", checkpoint.META))
    with pytest.raises(checkpoint.CheckpointError, match="not a selfaug checkpoint"):
        train.train(tiny_config(str(tmp_path), teacher={"value_dtype": "float32",
                                                        "output_dir": tiny_store.teacher.output_dir},
                                train={**SGD, "max_steps": 3}))
