"""SelfAug inside the Hugging Face trainers (selfaug/hf/): the same trainable parameters as `selfaug train`
on the same store, order, optimizer and schedule (1 process and 2 ranks with gradient accumulation 2;
top-k and sampled stores; LoRA and full), TRL's SFTTrainer through the mixin, outputs that peft,
`selfaug eval` and lm-eval read, and bad input refused before any optimizer step."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from conftest import ADAPTER, ROOT, clean_env, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug.train import lora_config
from selfaug.config import build_config
from selfaug.dist import free_port

sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from hf_train import hf_run  # noqa: E402

SGD = {"optim": "sgd", "min_lr_ratio": 1.0, "learning_rate": 0.05, "max_steps": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 2}
FILES = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A top-k and a sampled store of the tiny model, made once for the module."""
    out = {}
    for signal, extra in (("topk", {}), ("sampled", {"signal": "sampled", "samples": 16})):
        tmp = str(tmp_path_factory.mktemp(signal))
        cfg = tiny_config(tmp, teacher=extra)
        precompute.run(cfg)
        out[signal] = cfg.teacher.output_dir
    return out


def _recipe(tmp, store_dir, method, signal, **train_keys):
    teacher = {"output_dir": store_dir, **({"signal": "sampled", "samples": 16} if signal == "sampled" else {})}
    cfg = tiny_config(str(tmp), teacher=teacher, train={**SGD, "adapter": ADAPTER[method], **train_keys})
    return cfg, write_recipe(os.path.join(str(tmp), "r.yaml"), cfg)


def _assert_same(ref_dir, got_dir, method, tol=1e-5):
    ref, got = load_file(os.path.join(ref_dir, FILES[method])), load_file(os.path.join(got_dir, FILES[method]))
    assert set(ref) == set(got)
    if method == "lora":  # the adapters moved away from their init (B = 0), so the comparison is not vacuous
        assert max(v.abs().max().item() for k, v in got.items() if "lora_B" in k) > 1e-4
    for k in ref:
        assert torch.allclose(ref[k].float(), got[k].float(), atol=tol, rtol=0), (k, (ref[k] - got[k]).abs().max())


@pytest.mark.parametrize("method,signal,packing", [("lora", "topk", False), ("lora", "sampled", False),
                                                    ("full", "topk", False), ("full", "sampled", False),
                                                    ("lora", "topk", True)])
def test_one_process_selfaug_trainer_equals_selfaug_train(tmp_path, stores, method, signal, packing):
    cfg, recipe = _recipe(tmp_path, stores[signal], method, signal, packing=packing, micro_batch_size=2)
    out = train.train(cfg)
    trainer = hf_run(recipe, str(tmp_path / "hf"), deepspeed=False)
    _assert_same(os.path.join(out, "final"), str(tmp_path / "hf" / "final"), method)
    logs = [r for r in trainer.state.log_history if "nll" in r]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in logs] == [1, 2, 3]  # nll, kl and alpha beside loss, every step
    for r, m in zip(logs, metrics):
        assert r["nll"] == pytest.approx(m["nll"], rel=1e-5) and r["kl"] == pytest.approx(m["kl"], rel=1e-3, abs=1e-6)
        assert r["alpha"] == 0.5 and r["loss"] == pytest.approx(m["loss"], rel=1e-5)


def test_packing_under_flash_attentions_contract_equals_selfaug_train_padded(tmp_path, stores):
    """SelfAugTrainer packing under a CPU kernel with flash-attention's contract (tests/helpers/cpu_flash.py): one
    varlen row per micro-batch, whose examples never see each other, so 3 steps end at the padded run's adapters."""
    import cpu_flash
    cfg, _ = _recipe(tmp_path, stores["topk"], "lora", "topk", micro_batch_size=2)
    ref = train.train(cfg)  # padded, sdpa
    packed = build_config(cfg.to_dict(), [f"model.attn_implementation={cpu_flash.NAME}", "train.packing=true"])
    calls = cpu_flash.CALLS["varlen"]
    hf_run(write_recipe(str(tmp_path / "packed.yaml"), packed), str(tmp_path / "hf"), deepspeed=False)
    assert cpu_flash.CALLS["varlen"] > calls
    _assert_same(os.path.join(ref, "final"), str(tmp_path / "hf" / "final"), "lora")


def test_a_drift_budget_steers_alpha_and_resumes_from_a_trainer_checkpoint(tmp_path, stores):
    """drift_budget in SelfAugTrainer: the logged alpha follows the controller on the logged KL (the step's
    mean over all ranks), and a run resumed from checkpoint-2 continues the uninterrupted trajectory."""
    from selfaug.train.alpha import DriftBudget
    budget = 1e-8  # under the KL of the first steps of this tiny run (5e-9 at step 1, 1e-6 at step 5)
    cfg, recipe = _recipe(tmp_path, stores["topk"], "lora", "topk", max_steps=5, micro_batch_size=2)
    keys = {"drift_budget": budget, "drift_horizon": 2.0}
    save = {"save_strategy": "steps", "save_steps": 2}
    whole = hf_run(recipe, str(tmp_path / "whole"), deepspeed=False, args_extra=save, **keys)
    logs = [r for r in whole.state.log_history if "kl" in r]
    control = DriftBudget(budget, 0.5, 2.0, 0.01, 20.0)
    for step, r in enumerate(logs):
        assert r["alpha"] == pytest.approx(control.at(step), rel=1e-12)
        control.observe(r["kl"])
    assert logs[-1]["alpha"] > logs[0]["alpha"]
    resumed = hf_run(recipe, str(tmp_path / "whole"), deepspeed=False, args_extra=save,
                     resume=str(tmp_path / "whole" / "checkpoint-2"), **keys)
    again = [r for r in resumed.state.log_history if "kl" in r and r["step"] > 2]
    assert [r["step"] for r in again] == [3, 4, 5]
    assert [r["alpha"] for r in again] == pytest.approx([r["alpha"] for r in logs[2:]], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,method,signal,zero", [("accelerate", "lora", "topk", "zero2"),
                                                         ("deepspeed", "full", "sampled", "zero3")])
def test_two_ranks_with_accumulation_equal_selfaug_train(tmp_path, stores, launcher, method, signal, zero):
    """2 CPU ranks, grad_accum 2: LoRA under ZeRO-2 through `accelerate launch`, and full fine-tuning with a
    trainable head under ZeRO-3 through the deepspeed launcher (the head registered as in selfaug train),
    against `selfaug train` on one rank with the same global batch (micro 1 x accum 4; selfaug train on 2
    ranks equals that: train/test_cluster.py, train/test_train.py)."""
    cfg, recipe = _recipe(tmp_path, stores[signal], method, signal,
                          deepspeed=os.path.join(ROOT, "ds_configs", f"{zero}.json"))
    train.train(build_config(cfg.to_dict(), ["train.gradient_accumulation_steps=4"]))
    helper = os.path.join(ROOT, "tests", "helpers", "hf_train.py")
    out = str(tmp_path / "hf")
    if launcher == "accelerate":
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "recipes", "hf", "accelerate_zero2.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), helper, recipe, out]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), helper, recipe, out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _assert_same(os.path.join(cfg.train.output_dir, "final"), os.path.join(out, "final"), method)


def test_trl_sft_trainer_with_the_mixin_equals_selfaug_trainer(tmp_path, stores):
    pytest.importorskip("trl")
    cfg, recipe = _recipe(tmp_path, stores["topk"], "lora", "topk")
    hf_run(recipe, str(tmp_path / "hf"), deepspeed=False)
    trl = hf_run(recipe, str(tmp_path / "trl"), trainer="trl", deepspeed=False)
    assert type(trl).__mro__[2].__name__ == "SFTTrainer"
    _assert_same(str(tmp_path / "hf" / "final"), str(tmp_path / "trl" / "final"), "lora", tol=1e-6)


def test_outputs_load_in_peft_selfaug_eval_and_lm_eval(tmp_path, stores):
    from peft import PeftModel
    from selfaug.eval import evaluate
    from selfaug.models import load_model, load_tokenizer
    cfg, recipe = _recipe(tmp_path, stores["topk"], "lora", "topk")
    hf_run(recipe, str(tmp_path / "hf"), deepspeed=False)
    adapter = str(tmp_path / "hf" / "final")
    assert json.load(open(os.path.join(adapter, "selfaug_trainer.json")))["alpha"] == 0.5
    model = PeftModel.from_pretrained(load_model(cfg.model.name_or_path), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-4  # the trained adapter, not a fresh one
    # selfaug eval takes the adapter directory as a run
    ecfg = tiny_config(str(tmp_path), eval={"runs": adapter, "max_ifeval_prompts": 2, "max_rag_examples": 2,
                                            "max_drift_prompts": 2, "max_new_tokens": 8, "rag_max_new_tokens": 8,
                                            "output_dir": str(tmp_path / "eval")})
    report = evaluate.run(ecfg)
    assert report["models"]["final"]["alpha"] == 0.5 and report["models"]["final"]["drift_kl"] > 0
    # lm-eval's hf model with the adapter, on a local task
    base = str(tmp_path / "base")
    load_model(cfg.model.name_or_path).save_pretrained(base)
    load_tokenizer("builtin:tiny-llama").save_pretrained(base)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    fixture = os.path.join(ROOT, "tests", "fixtures", "lm_eval")
    yaml_text = open(os.path.join(fixture, "selfaug_tiny_qa.yaml")).read().replace(
        "DATA_FILE", os.path.join(fixture, "qa.jsonl"))
    (task_dir / "selfaug_tiny_qa.yaml").write_text(yaml_text)
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={base},peft={adapter}", "--tasks", "selfaug_tiny_qa", "--include_path",
                           str(task_dir), "--device", "cpu", "--batch_size", "2", "--output_path",
                           str(tmp_path / "lm_eval")], cwd=str(tmp_path), capture_output=True, text=True,
                          env=clean_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"selfaug_tiny_qa.*\|acc\s*\|", proc.stdout), proc.stdout[-2000:]


def test_bad_input_is_one_selfaug_error_before_any_step(tmp_path, stores):
    from transformers import TrainingArguments
    from selfaug.errors import SelfAugError
    from selfaug.hf import SelfAugTrainer
    from selfaug.models import load_model, load_tokenizer
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True)
    model, tok = load_model("builtin:tiny-llama"), load_tokenizer("builtin:tiny-llama")
    with pytest.raises(SelfAugError, match="does not exist: run `selfaug precompute`"):
        SelfAugTrainer(model=model, args=args, teacher_store=str(tmp_path / "nowhere"))
    other = load_tokenizer("builtin:tiny-llama")
    other.add_tokens(["<not-in-the-store>"])
    with pytest.raises(SelfAugError, match=r"not made for this model and tokenizer: tokenizer.vocab_sha256"):
        SelfAugTrainer(model=model, args=args, teacher_store=stores["topk"], processing_class=other)
    import datasets
    from selfaug import store
    rows = store.TeacherStore(stores["topk"])
    ids = [list(rows.example(i)["input_ids"]) for i in range(3)]
    ids[1][5] += 1
    with pytest.raises(SelfAugError, match=r"record 1 is not the store's example: .* from token 5 on"):
        SelfAugTrainer(model=model, args=args, teacher_store=stores["topk"], processing_class=tok,
                       train_dataset=datasets.Dataset.from_dict({"input_ids": ids}))
    with pytest.raises(SelfAugError, match=r"train.kl_tail='sideways' is not one of"):
        SelfAugTrainer(model=model, args=args, teacher_store=stores["topk"], kl_tail="sideways")
    # a model that is not the store's teacher: refused at its first micro-batch, no optimizer step taken.
    # (The teacher here has sharp distributions, a random Llama of the same shape at a larger init: the
    # bucket KL of a near-uniform teacher would not tell two random models apart.)
    from selfaug.models import tiny_llama_config
    sharp = tmp_path / "sharp"
    sharp.mkdir()
    (sharp / "config.json").write_text(json.dumps({**tiny_llama_config().to_dict(), "initializer_range": 0.5}))
    scfg = tiny_config(str(tmp_path), model={"name_or_path": str(sharp), "init": "random"},
                       teacher={"output_dir": str(tmp_path / "sharp_store")})
    precompute.run(scfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = SelfAugTrainer(model=model, args=args, teacher_store=scfg.teacher.output_dir, processing_class=tok)
    with pytest.raises(SelfAugError, match="is not the teacher of store .* KL to the stored teacher is"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_subset_of_the_store_by_example_id_trains_on_those_examples(tmp_path, stores):
    import datasets
    from selfaug import store
    from selfaug.hf import match_dataset
    rows = store.TeacherStore(stores["topk"])
    pick = [7, 2, 5]
    ds = datasets.Dataset.from_dict({"example_id": [rows.example(i)["example_id"] for i in pick],
                                     "input_ids": [rows.example(i)["input_ids"].tolist() for i in pick],
                                     "extra": ["kept", "out", "of it"]})
    matched = match_dataset(ds, rows)
    assert matched["selfaug_row"] == pick and matched["length"] == [len(rows.example(i)["input_ids"]) for i in pick]


def test_the_readme_snippet_runs_as_written(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## In your own trainer"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    store_cfg = tiny_config(str(tmp_path), teacher={"output_dir": str(tmp_path / "stores" / "my_store")})
    precompute.run(store_cfg)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert os.path.isfile(tmp_path / "out" / "final" / "adapter_model.safetensors")


def test_group_by_length_and_remove_unused_columns_keep_the_teacher_rows_with_their_examples(tmp_path, stores):
    """Another order (the trainer's length-grouped sampler) and remove_unused_columns=True: each example
    still meets its own teacher rows, so the KL at the start is the same model's (~0; a misaligned row
    would be refused by the teacher check) and the run trains."""
    cfg, recipe = _recipe(tmp_path, stores["topk"], "lora", "topk")
    from transformers import TrainingArguments
    from selfaug.hf import SelfAugTrainer
    from selfaug.models import load_model, load_tokenizer
    from peft import get_peft_model
    from selfaug.train import lora_config
    model = get_peft_model(load_model("builtin:tiny-llama"), lora_config(cfg.train))
    args = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1, train_sampling_strategy="group_by_length",
                             remove_unused_columns=True, learning_rate=1e-2)
    t = SelfAugTrainer(model=model, args=args, teacher_store=stores["topk"],
                       processing_class=load_tokenizer("builtin:tiny-llama"))
    t.train()
    logs = [r for r in t.state.log_history if "kl" in r]
    assert len(logs) == 3 and logs[0]["kl"] < 1e-4 and all(r["nll"] > 0 for r in logs)


def test_bf16_autocast_stays_finite_and_near_fp32_and_fp16_is_one_line(tmp_path, stores):
    """SelfAugTrainer with args.bf16 (CPU autocast here, as on a GPU): 4 SGD steps stay finite, within 2 % of the
    fp32 run's losses and, for the LoRA B updates, within 5 % (Frobenius norm). fp16 in any form is refused in
    one line before any step: the head's gradients are computed before a loss scale applies."""
    from peft import get_peft_model
    from transformers import TrainingArguments
    from selfaug.hf import SelfAugTrainer
    from selfaug.models import load_model, load_tokenizer
    cfg, recipe = _recipe(tmp_path, stores["topk"], "lora", "topk", max_steps=4, learning_rate=0.5, micro_batch_size=2)
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", {"bf16": True})):
        t = hf_run(recipe, str(tmp_path / name), deepspeed=False, args_extra=extra)
        runs[name] = ([r for r in t.state.log_history if "nll" in r], load_file(str(tmp_path / name / "final" / FILES["lora"])))
    (l32, a32), (l16, a16) = runs["fp32"], runs["bf16"]
    for r32, r16 in zip(l32, l16):
        assert math.isfinite(r16["loss"]) and r16["loss"] == pytest.approx(r32["loss"], rel=0.02)
    for key in (k for k in a32 if "lora_B" in k):
        assert a32[key].norm() > 0 and (a16[key].float() - a32[key]).norm() <= 0.05 * a32[key].norm(), key
    assert any(not torch.equal(a16[k], a32[k]) for k in a32)  # autocast really ran the steps in bf16
    model = get_peft_model(load_model("builtin:tiny-llama", torch.float16), lora_config(cfg.train))
    args = TrainingArguments(str(tmp_path / "fp16"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(train.TrainError, match="the model's weights are float16: SelfAug's loss computes"):
        SelfAugTrainer(model=model, args=args, teacher_store=stores["topk"], processing_class=load_tokenizer(
            "builtin:tiny-llama"))
    from types import SimpleNamespace
    from selfaug.hf.trainer import refuse_fp16
    fp32 = get_peft_model(load_model("builtin:tiny-llama"), lora_config(cfg.train))
    refuse_fp16(args, fp32)
    for given, why in (({"fp16": True}, "args.fp16=True"), ({"fp16_full_eval": True}, "args.fp16_full_eval=True"),
                       ({"hf_deepspeed_config": SimpleNamespace(config={"fp16": {"enabled": True}})},
                        "the DeepSpeed config enables fp16")):
        with pytest.raises(train.TrainError, match=re.escape(why) + ": SelfAug's loss computes"):
            refuse_fp16(SimpleNamespace(**given), fp32)


def test_the_trainer_internals_the_mixin_relies_on_are_the_tested_ones(tmp_path, stores):
    """The private Trainer methods the mixin overrides keep their signatures, and one optimizer step calls
    get_batch_samples once (with the accumulation's micro-batches) before the compute_loss of each, then the
    step's end: a transformers release that changes either fails here, loudly. The range is pyproject's, and a
    transformers outside it is one line."""
    import inspect
    from transformers import Trainer, TrainingArguments
    from selfaug.hf import SelfAugTrainer
    from selfaug.hf.trainer import TRANSFORMERS, check_transformers
    from selfaug.models import load_model, load_tokenizer
    signatures = {"_remove_unused_columns": ["self", "dataset", "description"],
                  "_get_collator_with_removed_columns": ["self", "data_collator", "description"],
                  "_get_train_sampler": ["self", "train_dataset"],
                  "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
                  "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
                  "log": ["self", "logs", "start_time"], "save_model": ["self", "output_dir", "_internal_call"]}
    for name, params in signatures.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name
    calls = []

    class Recording(SelfAugTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
            calls.append(("batches", len(batches)))
            return batches, n

        def compute_loss(self, *a, **k):
            calls.append(("loss", self.state.global_step))
            return super().compute_loss(*a, **k)

        def _get_train_sampler(self, *a, **k):
            calls.append(("sampler",))
            return super()._get_train_sampler(*a, **k)

    model = get_peft_model(load_model("builtin:tiny-llama"), lora_config(tiny_config(str(tmp_path)).train))
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    Recording(model=model, args=args, teacher_store=stores["topk"], processing_class=load_tokenizer(
        "builtin:tiny-llama")).train()
    assert calls == [("sampler",), ("batches", 2), ("loss", 0), ("loss", 0), ("batches", 2), ("loss", 1), ("loss", 1)]
    # drift_horizon auto: a twentieth of the optimizer steps the Trainer will take, counted as it counts them
    by_epochs = TrainingArguments(str(tmp_path / "epochs"), num_train_epochs=90, per_device_train_batch_size=1,
                                  gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    budgeted = SelfAugTrainer(model=model, args=by_epochs, teacher_store=stores["topk"], drift_budget=0.02,
                              processing_class=load_tokenizer("builtin:tiny-llama"))
    steps = math.ceil(90 * max(len(budgeted.get_train_dataloader()) // 2, 1))
    assert steps >= 40 and budgeted._selfaug["alpha"].horizon == steps / 20
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert f'"transformers{",".join(TRANSFORMERS)}"' in pyproject
    check_transformers()
    with pytest.raises(train.TrainError, match=r"selfaug.hf supports transformers >=5.25,<6 .* found 4.56.0: pip"):
        check_transformers("4.56.0")
