import json
import os
import subprocess
import sys
import tempfile
import time

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


ADAPTER = {"lora": "lora", "full": "none"}  # train.adapter of each method a test is parametrized by


def tiny_config(tmp, **sections):
    """A tiny-llama recipe writing under tmp; sections override keys: tiny_config(tmp, train={"alpha": 0})."""
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train": "builtin:rag", "builtin_train_size": 12, "max_seq_len": 512},
        "teacher": {"output_dir": os.path.join(tmp, "teacher"), "k": 8, "shard_size": 5, "forward_tokens": 2048},
        "train": {"output_dir": os.path.join(tmp, "run"), "deepspeed": os.path.join(ROOT, "ds_configs/zero2.json"),
                  "max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "loss_chunk_rows": 256},
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


def spawn(stage, recipe, overrides=(), nprocs=1, env=None):
    """Start `selfaug STAGE` on nprocs CPU ranks with the variables a launcher gives each rank (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the ranks the `deepspeed` launcher would start,
    without its two extra interpreters (each ~5 s of CPU). The launchers themselves are tested in
    train/test_preemption.py, hf/test_hf.py and the demo. [(Popen, stdout file, stderr file)], the port."""
    cmd = [sys.executable, "-m", "selfaug", stage, "--config", recipe, *overrides]
    port, procs = str(free_port()), []
    for rank in range(nprocs):
        rank_env = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {}))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=out, stderr=err, text=True), out, err))
    return procs, port


def kill_ranks(procs):
    """SIGKILL every rank."""
    for p, *files in procs:
        p.kill()
        p.wait()
        for f in files:
            f.close()


def launch(stage, recipe, overrides=(), nprocs=1, check=True, timeout=600, env=None):
    """Run `selfaug STAGE` on nprocs ranks (spawn) to the end; a rank that fails takes the others down. A
    CompletedProcess (the ranks' output in rank order) with the rendezvous `.master_port`. env: more variables
    (SELFAUG_STOP_AFTER=N: `selfaug train` checkpoints and stops after step N)."""
    procs, port = spawn(stage, recipe, overrides, nprocs, env)
    cmd = procs[0][0].args
    deadline, failed_at, timed_out = time.time() + timeout, None, False
    try:
        while any(p.poll() is None for p, _, _ in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p, _, _ in procs):
                failed_at = time.time()  # the others wait for it in a collective: a moment, then stop them
            timed_out = timed_out or time.time() > deadline
            if timed_out or (failed_at is not None and time.time() > failed_at + 10):
                break
            time.sleep(0.1)
    finally:  # nothing left running, whatever ended the wait
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p, _, _ in procs]
    text = []
    for _, *files in procs:
        text.append([(f.seek(0), f.read(), f.close())[1] for f in files])
    proc = subprocess.CompletedProcess(cmd, next((c for c in codes if c != 0), 0),
                                       "".join(t[0] for t in text), "".join(t[1] for t in text))
    proc.master_port = port
    if timed_out:
        raise AssertionError(f"{' '.join(cmd)} on {nprocs} ranks ran past {timeout} s:\n{proc.stderr[-5000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} on {nprocs} ranks failed (exit status {codes}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def one_line(capsys, argv, match):
    """`selfaug ARGV` exits 2 with exactly one line `selfaug: error: ...` holding `match`; that line."""
    from selfaug.cli import main
    code = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("selfaug: error: ")]
    assert code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, (code, err[-3000:])
    return lines[0]


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
