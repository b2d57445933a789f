"""Several nodes under SLURM, simulated on this machine (docs/clusters.md, "Several nodes"): the shipped batch
scripts run as `sbatch` runs them, with `srun` and `scontrol` standing in for SLURM's. The torchrun script starts
two torchrun launchers (node ranks 0 and 1, one rank each, a c10d rendezvous on 127.0.0.1, each node its own
SELFAUG_CACHE); a USR1 to the batch shell reaches every rank of both nodes, the job exits 75 and asks to be
requeued, and the requeued job ends where an uninterrupted run ends. The DeepSpeed-runner script's hostfile is
made from SLURM_JOB_NODELIST and handed to `selfaug launch` (no ssh here)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, clean_env, read_metrics, tiny_config, write_recipe
from selfaug import train
from selfaug.dist import free_port

SGD = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9}
STEPS = 10
# srun: the command once per node, in parallel, each with its node id and its own node-local cache
FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
  SLURM_NODEID=$node SLURM_PROCID=$node SELFAUG_CACHE=$FAKE_CACHES/node$node "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf '%s\\n' $FAKE_HOSTS ;;
  "requeue "*) echo "$2" >> "$FAKE_REQUEUED" ;;
esac
"""


def _fake_slurm(tmp_path, hosts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    from selfaug.data import cache_dir
    from selfaug.models import SMOLLM2, resolve_source
    converted = resolve_source(SMOLLM2)[0]  # each node's own cache, with the embedded model already converted
    for node in range(len(hosts)):  # there (as `launch.sh setup` leaves it on a real node): no 100 s conversion
        (tmp_path / "cache" / f"node{node}").mkdir(parents=True)
        os.symlink(converted, tmp_path / "cache" / f"node{node}" / os.path.relpath(converted, cache_dir()))
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_HOSTS=" ".join(hosts), FAKE_CACHES=str(tmp_path / "cache"),
                FAKE_REQUEUED=str(tmp_path / "requeued"), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node-[a-b]",
                SLURM_NNODES=str(len(hosts)), SLURM_SUBMIT_DIR=str(tmp_path), GPUS_PER_NODE="1")


def _config(tmp_path, tiny_store, grad_accum):
    """The same global batch of 4: micro 2 x accum 2 on 1 rank, micro 2 on the 2 ranks of 2 nodes; relative
    output directory (the job runs in its submit directory)."""
    return tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                       train={**SGD, "max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": grad_accum,
                              "output_dir": "run"})


@pytest.mark.slow
def test_two_nodes_of_torchrun_stop_together_exit_75_requeue_and_resume_as_uninterrupted(tmp_path, tiny_store):
    whole = tmp_path / "whole"
    whole.mkdir()
    cwd = os.getcwd()
    os.chdir(whole)  # the uninterrupted run, in-process, on 1 rank
    try:
        expected = load_file(os.path.join(train.train(_config(tmp_path, tiny_store, 2)), "final",
                                          "adapter_model.safetensors"))
    finally:
        os.chdir(cwd)
    job = tmp_path / "job"
    job.mkdir()
    write_recipe(str(job / "recipe.yaml"), _config(tmp_path, tiny_store, 1))
    env = clean_env(**_fake_slurm(job, ["127.0.0.1", "127.0.0.1"]), RECIPE="recipe.yaml", SELFAUG_PYTHON=sys.executable,
                    MASTER_PORT=str(free_port()))
    script = os.path.join(ROOT, "recipes", "slurm", "multinode_torchrun.sbatch")
    log = open(job / "slurm-7.out", "w+")
    batch = subprocess.Popen([script], cwd=job, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = job / "run" / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    batch.send_signal(signal.SIGUSR1)  # --signal=B:USR1@N: the batch shell alone
    try:
        rc = batch.wait(timeout=180)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    log.seek(0)
    output = log.read()
    assert rc == 75, output[-4000:]
    assert sorted(os.listdir(job / "run" / ".exit")) == ["rank-0-of-2", "rank-1-of-2"], output[-3000:]
    assert (job / "requeued").read_text() == "7\n" and "requeueing job 7" in output
    stopped = len(read_metrics(job / "run"))
    assert 1 <= stopped < STEPS and output.count(f"stopped on request after optimizer step {stopped}") == 2
    assert (job / "run" / "checkpoints" / "latest").read_text() == f"step-{stopped}"
    assert sorted(os.listdir(job / "cache")) == ["node0", "node1"]  # each node its own cache
    # the requeued job: the same script, resumed to the end
    rc = subprocess.run([script], cwd=job, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode
    log.seek(0)
    assert rc == 0, log.read()[-4000:]
    assert [r["step"] for r in read_metrics(job / "run")] == list(range(1, STEPS + 1))
    got = load_file(job / "run" / "final" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_the_deepspeed_runner_script_makes_its_hostfile_from_the_nodelist_and_requeues_on_75(tmp_path):
    env = clean_env(**{**_fake_slurm(tmp_path, ["node-a", "node-b"]), "GPUS_PER_NODE": "4"}, RECIPE="my.yaml")
    fake = tmp_path / "bin" / "selfaug"  # stands in for `selfaug launch`: what it was given, then a stop's 75
    fake.write_text('#!/bin/bash\n{ echo "$*"; echo "NUM_GPUS=$NUM_GPUS"; cat "$HOSTFILE"; } > "$FAKE_CACHES.args"\n'
                    'exit 75\n')
    fake.chmod(0o755)
    script = os.path.join(ROOT, "recipes", "slurm", "multinode_deepspeed.sbatch")
    out = subprocess.run([script, "train.max_steps=3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 75, out.stderr
    assert (tmp_path / "cache.args").read_text().splitlines() == [
        "launch train my.yaml train.max_steps=3", "NUM_GPUS=4", "node-a slots=4", "node-b slots=4"]
    assert (tmp_path / "requeued").read_text() == "7\n"
    # `selfaug launch` hands that hostfile to DeepSpeed's runner (whose pdsh command test_launcher.py parses)
    from selfaug.launcher import runner_command
    os.environ["HOSTFILE"] = str(tmp_path / "hostfile-7")
    try:
        cmd, _ = runner_command("train", "my.yaml", [])
    finally:
        del os.environ["HOSTFILE"]
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "hostfile-7")


def test_every_batch_script_logs_into_the_submit_directory_and_is_requeueable():
    for name in ("train.sbatch", "multinode_torchrun.sbatch", "multinode_deepspeed.sbatch"):
        text = open(os.path.join(ROOT, "recipes", "slurm", name)).read()
        assert "#SBATCH --output=slurm-%j.out" in text, name  # SLURM does not create a missing folder
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text, name
