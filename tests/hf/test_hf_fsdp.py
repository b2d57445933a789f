"""SelfAugTrainer under FSDP2 (docs/trainer.md, "Sharded: DeepSpeed and FSDP2"): 2 CPU ranks over gloo through the
Trainer's own FSDP2 path (accelerate's fsdp2_prepare_model) end where `selfaug train` ends on one rank with the
same global batch, as ZeRO-3 does (test_hf.py): LoRA with a frozen head under activation checkpointing, and full
fine-tuning with a trained head loaded with cpu_ram_efficient_loading, accumulation 2. The head is gathered once per
micro-batch (counted on FSDP2's all-gathers); a head still sharded where the loss reads it, and FSDP version 1, are
one error each."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER, ROOT, clean_env, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug.config import build_config
from selfaug.dist import free_port
from selfaug.models import load_model
from selfaug.train import TrainError

sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from hf_train import hf_run  # noqa: E402

SGD = {"optim": "sgd", "min_lr_ratio": 1.0, "learning_rate": 0.05, "max_steps": 3, "micro_batch_size": 1,
       "gradient_accumulation_steps": 2}
RUNS = {"lora": ({"gradient_checkpointing": True}, {"version": 2}),  # the recipe's keys, the run's fsdp_config
        "full": ({}, {"version": 2, "cpu_ram_efficient_loading": True})}
FILES = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    cfg = tiny_config(str(tmp_path_factory.mktemp("store")))
    precompute.run(cfg)
    return cfg.teacher.output_dir


def _recipe(tmp, store_dir, method, **train_keys):
    cfg = tiny_config(str(tmp), teacher={"output_dir": store_dir}, train={**SGD, "adapter": ADAPTER[method], **train_keys})
    return cfg, write_recipe(os.path.join(str(tmp), "r.yaml"), cfg)


@pytest.mark.slow
def test_two_ranks_under_fsdp2_equal_selfaug_train_and_gather_the_head_once_per_micro_batch(tmp_path, store_dir):
    recipes, outs, refs = [], [], {}
    for method, (keys, _) in RUNS.items():
        cfg, recipe = _recipe(tmp_path / method, store_dir, method, **keys)
        # one rank, micro 1 x accum 4: the global batch of 2 ranks x accum 2
        refs[method] = os.path.join(train.train(build_config(cfg.to_dict(), ["train.gradient_accumulation_steps=4"])),
                                    "final", FILES[method])
        recipes.append(recipe)
        outs.append(str(tmp_path / method / "hf"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "tests", "helpers", "hf_train.py"), ",".join(recipes), ",".join(outs),
           json.dumps([config for _, config in RUNS.values()])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    initial_head = load_model(cfg.model).lm_head.weight.detach()
    head_bytes = initial_head.numel() * initial_head.element_size()
    for method, out in zip(RUNS, outs):
        ref, got = load_file(refs[method]), load_file(os.path.join(out, "final", FILES[method]))
        assert set(ref) == set(got)
        for k in ref:
            assert torch.allclose(ref[k], got[k], atol=1e-5, rtol=0), (method, k, (ref[k] - got[k]).abs().max())
        if method == "lora":  # the adapters moved away from their init (B = 0)
            assert max(v.abs().max().item() for k, v in got.items() if "lora_B" in k) > 1e-4
        else:  # the head trained
            assert (got["lm_head.weight"] - initial_head).abs().max() > 1e-4
        for rank in (0, 1):
            with open(os.path.join(out, f"fsdp_head_rank{rank}.json")) as f:
                counts = json.load(f)
            # gathered whole once per micro-batch, in the forward (kept through backward: reshard_after_forward=False)
            assert counts["gathers"] == counts["micro_batches"] == 6, (method, counts)
            assert counts["gathered_bytes"] == 6 * head_bytes
            # a trained head's gradient reduce-scattered once per micro-batch; a frozen head has none
            assert counts["reduce_scatters"] == (6 if method == "full" else 0), (method, counts)


def test_a_head_still_sharded_where_the_loss_reads_it_is_one_error(tmp_path, store_dir):
    """A head that is a DTensor shard when the loss reads it (what FSDP2 would leave if the loss ran before its
    unshard, or tensor parallelism of the head): one TrainError, not a wrong loss or a mixed-tensor error."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers import TrainerCallback

    class ShardTheHead(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            head = model.get_output_embeddings()
            mesh = init_device_mesh("cpu", (1,))
            head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]),
                                             requires_grad=False)

    _, recipe = _recipe(tmp_path, store_dir, "lora")
    started = not tdist.is_initialized()
    if started:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(TrainError, match="sharded DTensor"):
            hf_run(recipe, str(tmp_path / "hf"), deepspeed=False, callbacks=[ShardTheHead()])
    finally:
        if started:
            tdist.destroy_process_group()


def test_fsdp_version_1_is_refused_in_one_line(tmp_path, store_dir):
    _, recipe = _recipe(tmp_path, store_dir, "lora")
    with pytest.raises(TrainError, match=r'fsdp_config=\{"version": 2\}'):
        hf_run(recipe, str(tmp_path / "hf"), fsdp={"version": 1})
