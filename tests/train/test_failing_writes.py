"""A full disk or a failing write loses nothing: a real failing write (RLIMIT_FSIZE in the child makes
writes fail with EFBIG) during a store shard, a checkpoint or a checkpoint's universal form, and SIGKILL in
the middle of a checkpoint, leave the previous state intact and named; the command exits non-zero with one
line; the rerun finishes."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, clean_env, tiny_config, write_recipe
from selfaug import precompute, store, train
from selfaug.config import build_config
from selfaug.train import checkpoint

CHILD = """
import os, resource, signal, sys
sys.path.insert(0, {root!r})
limit = int(os.environ.get("FSIZE", "0"))
if limit:  # nothing is compiled on the way (dist.skip_cpu_shm_op): the limit meets the run's own writes
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
if os.environ.get("KILL_IN_SAVE"):  # SIGKILL once DeepSpeed's files of the checkpoint are written
    from selfaug.train import checkpoint
    checkpoint.rng_state = lambda: os.kill(os.getpid(), signal.SIGKILL)
from selfaug.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(args, **env):
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), *args], cwd=ROOT, capture_output=True,
                          text=True, env=clean_env(**env), timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("selfaug: error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc, errors


def test_a_shard_that_cannot_be_written_leaves_no_complete_claim_and_the_rerun_finishes(tmp_path, tiny_store):
    cfg = tiny_config(str(tmp_path))  # the tokenized data is cached already (tiny_store): only shards are written
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    proc, errors = _child(["precompute", "--config", recipe], FSIZE=str(20_000))
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not write shard" in errors[0] and "shards/shard-00000.arrow" in errors[0] and "too large" in errors[0]
    manifest = json.load(open(os.path.join(cfg.teacher.output_dir, "manifest.json")))
    assert manifest["status"] != "complete"
    assert not glob.glob(os.path.join(cfg.teacher.output_dir, "shards", "*.json"))  # no shard claims it is whole
    assert not glob.glob(os.path.join(cfg.teacher.output_dir, "**", "*.tmp"), recursive=True)
    precompute.run(cfg)  # the rerun, in this process
    manifest, problems = store.verify_store(cfg.teacher.output_dir, values=True)
    assert manifest["status"] == "complete" and problems == []


def test_a_failed_or_killed_checkpoint_leaves_latest_on_the_previous_one(tmp_path, tiny_store, capsys):
    keys = {"max_steps": 4, "save_steps": 1, "optim": "sgd", "min_lr_ratio": 1.0}
    ref = train.train(tiny_config(str(tmp_path / "ref"), teacher={"output_dir": tiny_store.teacher.output_dir},
                                  train=keys))  # uninterrupted
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": tiny_store.teacher.output_dir},
                      train=keys)
    train.train(cfg, stop_after=2)  # checkpoints step-1 and step-2
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    latest = os.path.join(cfg.train.output_dir, "checkpoints", "latest")
    # step 3's checkpoint cannot be written: each of DeepSpeed's files (the adapter's fp32 weights, about 150 KB;
    # the frozen base is not written) is over the file-size limit
    proc, errors = _child(["train", "--config", recipe], FSIZE=str(100_000))
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "checkpoint of step 3 could not be written" in errors[0] and "still names" in errors[0] \
        and "step-2" in errors[0] and "too large" in errors[0].lower(), errors[0]
    assert open(latest).read() == "step-2"
    # killed with SIGKILL in the middle of step 3's checkpoint
    proc, _ = _child(["train", "--config", recipe], KILL_IN_SAVE="1")
    assert proc.returncode == -signal.SIGKILL
    assert open(latest).read() == "step-2" and os.path.isdir(os.path.join(os.path.dirname(latest), "step-3"))
    # the rerun (in this process) resumes from step 2 and ends where the uninterrupted run ends
    capsys.readouterr()
    train.train(cfg)
    assert "resumed from" in "".join(capsys.readouterr())
    a = load_file(os.path.join(ref, "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(cfg.train.output_dir, "final", "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [json.loads(line)["step"] for line in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    # the universal form a resume at another world size writes cannot be written: one line, no `universal/`
    step2 = os.path.join(cfg.train.output_dir, "checkpoints", "step-2")
    code = (f"import resource, sys; sys.path.insert(0, {ROOT!r}); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "  # under one parameter's file
            "from selfaug.train import checkpoint; checkpoint.universal(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, step2], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env())
    assert proc.returncode == 1 and "CheckpointError: the universal form of" in proc.stderr, proc.stderr[-3000:]
    assert "too large" in proc.stderr.lower() and not os.path.exists(os.path.join(step2, "universal"))
    folder, _ = checkpoint.universal(step2)  # the rerun, in this process: each parameter's value, whole
    sd = torch.load(os.path.join(step2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
    flat = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    for name, at in sd["optimizer_state_dict"]["param_slice_mappings"][0].items():
        value = torch.load(os.path.join(folder, "zero", name, "fp32.pt"), weights_only=False)["param"]
        assert "lora_" in name and torch.equal(value.flatten(), flat.narrow(0, at.start, at.numel))


def test_a_failed_second_save_of_final_leaves_the_previous_one_whole_and_loadable(tmp_path, tiny_store):
    from peft import PeftModel
    from selfaug import durable
    from selfaug.models import load_model
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": tiny_store.teacher.output_dir},
                      train={"save_steps": 2})
    train.train(cfg)  # a finished run: checkpoint step-2 and final/
    final = os.path.join(cfg.train.output_dir, "final")
    before = {name: open(os.path.join(final, name), "rb").read() for name in os.listdir(final)}
    assert durable.is_complete(final) and "adapter_model.safetensors" in before
    # started again (resume: auto), the finished run saves final/ again; its adapter is over the file-size limit
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    proc, errors = _child(["train", "--config", recipe], FSIZE=str(20_000))
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "final could not be written" in errors[0] and "previous final/ is kept" in errors[0], errors[0]
    assert {name: open(os.path.join(final, name), "rb").read() for name in os.listdir(final)} == before
    assert not glob.glob(final + ".*")  # nothing left beside it
    PeftModel.from_pretrained(load_model(cfg.model, torch.float32), final)  # loadable as it was
    # a study or a sweep takes a final/ without its marker (a partial one) for untrained
    from selfaug.eval import study
    assert study._trained(cfg)
    os.remove(os.path.join(final, durable.COMPLETE))
    assert not study._trained(cfg)
    assert '[ -f "$out/final/COMPLETE" ]' in open(os.path.join(ROOT, "launch.sh")).read()


def test_a_torn_last_line_of_metrics_is_cut_off_with_a_message_on_resume(tmp_path, capsys):
    """A full disk mid-append leaves half a line: every resume failed on it with a JSONDecodeError."""
    from selfaug.train import metrics
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    metrics.truncate(path, 2)
    assert open(path).read() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert "its last line (3) was torn by a crash or a full disk and is cut off" in capsys.readouterr().out
    open(path, "w").write('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')  # not the last line: edited, not torn
    with pytest.raises(checkpoint.CheckpointError, match="metrics.jsonl:1 is not JSON"):
        metrics.truncate(path, 2)
