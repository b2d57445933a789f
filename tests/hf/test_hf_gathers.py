"""SelfAugTrainer under ZeRO-3 with a frozen head (LoRA): the head is gathered once per micro-batch, by its own
pre-hook inside the forward DeepSpeed traces, where the loss uses it (a second gather for the loss after the
forward was a whole head's all-gather per micro-batch: 1 GB at 8B in bf16). Counted on DeepSpeed's own gathers."""
import os
import sys

from transformers import TrainerCallback

from conftest import ROOT, tiny_config, write_recipe

sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from hf_train import hf_run  # noqa: E402


class CountHeadGathers(TrainerCallback):
    """Wraps each parameter's all_gather and all_gather_coalesced (DeepSpeed's ZeRO-3 gathers) once training
    begins, counting the calls whose parameters include the head's weight."""

    def __init__(self):
        self.gathers = 0
        self.micro_batches = 0
        self.training = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        head = model.get_output_embeddings().weight
        assert hasattr(head, "ds_id") and not head.requires_grad

        def wrap(p, name):
            real = getattr(p, name)

            def counted(*a, **k):
                params = k.get("param_list") or (a[0] if a else None) or [p]
                self.gathers += self.training and any(q is head for q in params)
                return real(*a, **k)
            setattr(p, name, counted)
        for p in model.parameters():
            wrap(p, "all_gather")
            wrap(p, "all_gather_coalesced")
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # saving gathers too

    def on_step_end(self, args, state, control, **kwargs):
        self.micro_batches += args.gradient_accumulation_steps


def test_a_frozen_zero3_head_is_gathered_once_per_micro_batch(tmp_path, tiny_store):
    """In a process of its own: a ZeRO-3 Trainer leaves transformers' and accelerate's DeepSpeed state set for the
    process, and models built later in it would be created partitioned."""
    import subprocess

    from conftest import clean_env
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": tiny_store.teacher.output_dir},
                      train={"adapter": "lora", "optim": "sgd", "min_lr_ratio": 1.0, "max_steps": 3,
                             "micro_batch_size": 1, "gradient_accumulation_steps": 2,
                             "deepspeed": os.path.join(ROOT, "ds_configs", "zero3.json")})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    script = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {os.path.join(ROOT, 'tests', 'hf')!r}]\n"
              "from test_hf_gathers import CountHeadGathers, hf_run\n"
              f"counter = CountHeadGathers(); hf_run({recipe!r}, {str(tmp_path / 'hf')!r}, callbacks=[counter])\n"
              "print('counted', counter.gathers, counter.micro_batches)")
    from selfaug.dist import free_port
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=str(free_port())))
    counted = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("counted")]
    assert done.returncode == 0 and counted, done.stderr[-3000:]
    gathers, micro_batches = map(int, counted[0])
    assert micro_batches == 6 and gathers == micro_batches, (gathers, micro_batches)
