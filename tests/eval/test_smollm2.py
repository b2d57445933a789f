"""Integration on the embedded real model, SmolLM2-135M-Instruct: the demo's small variant end to end
(precompute, LoRA and SelfAug training, eval), and its store against the full-vocabulary reference."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, clean_env
from test_precompute import _check_against_reference
from selfaug import store as ts
from selfaug.models import load_model

SMALL = ["data.builtin_train_size=6", "data.builtin_eval_size=3", "teacher.shard_size=4", "train.max_steps=1",
         "train.micro_batch_size=2", "eval.max_ifeval_prompts=2", "eval.max_rag_examples=3",
         "eval.max_drift_prompts=2", "eval.max_new_tokens=12", "eval.rag_max_new_tokens=8"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo"))
    env = clean_env(DEMO_DIR=d, NUM_PROCS="1")
    out = subprocess.run(["./launch.sh", "demo", "recipes/smollm2_demo.yaml", *SMALL], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return d, out.stdout


def test_small_demo_runs_end_to_end(demo):
    d, stdout = demo
    report = json.load(open(os.path.join(d, "report.json")))
    assert set(report["models"]) == {"base", "lora", "selfaug"}
    assert report["models"]["lora"]["alpha"] == 0 and report["models"]["selfaug"]["alpha"] == 0.5
    assert report["models"]["base"]["drift_kl"] == pytest.approx(0, abs=1e-6)
    assert report["models"]["lora"]["drift_kl"] > 0
    for png in ("tradeoff.png", "curves.png"):
        assert os.path.getsize(os.path.join(d, png)) > 1000
    assert "IFEval strict" in stdout and "demo wall time" in stdout
    assert os.path.exists(os.path.join(d, "selfaug", "final", "adapter_model.safetensors"))


def test_smollm2_store_equals_full_vocabulary_reference(demo):
    d, _ = demo
    store = os.path.join(d, "teacher")
    manifest, problems = ts.verify_store(store)
    assert problems == [] and manifest["settings"]["k"] == 64 and manifest["settings"]["model"]["vocab_size"] == 49152
    assert manifest["totals"]["examples"] == 6 and manifest["totals"]["mean_tail_mass"] < 0.5
    _check_against_reference(store, load_model("builtin:smollm2-135m-instruct"), "prompt", value_tol=2e-2)


def test_the_estimated_store_size_of_the_demo_recipe_is_within_5_percent(demo):
    from selfaug import estimate
    from selfaug.config import load_config
    d, _ = demo
    cfg = load_config(os.path.join(ROOT, "recipes", "smollm2_demo.yaml"), SMALL + [f"teacher.output_dir={d}/teacher"])
    got = estimate.run(cfg, gpus=1)
    written = ts.read_manifest(os.path.join(d, "teacher"))["totals"]
    assert got["positions"] == written["positions"]
    assert abs(got["store_bytes"] / written["bytes"] - 1) < 0.05, (got["store_bytes"], written["bytes"])
