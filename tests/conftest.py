import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/selfaug/torch_extensions"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker its own tokenization cache: no two writers of one file
    _cache = os.environ.get("SELFAUG_CACHE", os.path.expanduser("~/.cache/selfaug"))
    os.environ.setdefault("SELFAUG_DATA_CACHE", os.path.join(_cache, "tokenized-" + os.environ["PYTEST_XDIST_WORKER"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from selfaug.config import build_config  # noqa: E402
from selfaug.dist import free_port  # noqa: E402


def tiny_config(tmp, **sections):
    """A tiny-llama recipe writing under tmp; sections override keys: tiny_config(tmp, train={"alpha": 0})."""
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train": "builtin:rag", "builtin_train_size": 12, "max_seq_len": 512},
        "teacher": {"output_dir": os.path.join(tmp, "teacher"), "k": 8, "shard_size": 5, "batch_tokens": 2048},
        "train": {"output_dir": os.path.join(tmp, "run"), "deepspeed": os.path.join(ROOT, "ds_configs/zero2.json"),
                  "max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "loss_chunk_rows": 256},
        "eval": {"output_dir": os.path.join(tmp, "eval")},
        "study": {"output_dir": os.path.join(tmp, "study")},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return build_config(raw)


def write_recipe(path, cfg):
    cfg.save(path)
    return path


def clean_env(**extra):
    """The environment for a child launch: without the rank and rendezvous variables that in-process
    runs put into this process's environment (a child reusing MASTER_PORT would collide)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", **extra}


def launch(stage, recipe, overrides=(), nprocs=1, check=True, timeout=600):
    """Run `selfaug STAGE` under the deepspeed launcher with nprocs CPU processes."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nprocs),
           "--master_port", str(free_port()), "--module", "selfaug", stage, "--config", recipe, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A small store (fp32 values) shared by the read-only tests."""
    from selfaug import precompute
    tmp = str(tmp_path_factory.mktemp("store"))
    cfg = tiny_config(tmp, teacher={"value_dtype": "float32"})
    precompute.run(cfg)
    return cfg
