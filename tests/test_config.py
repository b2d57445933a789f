"""Recipes as the ecosystem writes them (docs/design.md, "Configuration"): the Trainer's names, the old names
refused in one line (and read in a config saved by an earlier version), YAML lists, all-linear as peft expects it,
epochs beside steps, and the W&B settings."""
import os

import pytest
import yaml

from conftest import ROOT, tiny_config
from selfaug.config import ConfigError, build_config, load_config


@pytest.mark.parametrize("old,new,who", [("lr", "learning_rate", " (the Hugging Face Trainer's and axolotl's name)"),
                                         ("grad_accum", "gradient_accumulation_steps", " (the Hugging Face Trainer's and"),
                                         ("save_every", "save_steps", " (the Hugging Face Trainer's name)"),
                                         ("log_every", "logging_steps", " (the Hugging Face Trainer's name)"),
                                         ("method", "adapter", " (axolotl's name)"),
                                         ("optimizer", "optim", " (the Hugging Face Trainer's name)"),
                                         ("batch_tokens", "micro_batch_tokens", ": rename")])  # selfaug's own name
def test_an_old_name_is_one_line_naming_the_new_one(tmp_path, old, new, who):
    with pytest.raises(ConfigError, match=rf"train.{old} is now train.{new}{__import__('re').escape(who)}"):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), [f"train.{old}=1"])
    with pytest.raises(ConfigError, match=r"teacher.batch_tokens is now teacher.forward_tokens: rename it"):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), ["teacher.batch_tokens=4096"])


def test_the_names_claimed_for_the_trainer_and_trl_are_theirs():
    """What the rename lines and the README call the Trainer's names are fields of transformers' TrainingArguments
    and of TRL's SFTConfig (installed here; axolotl is not, so its names are claimed only where certain)."""
    import dataclasses
    import re
    from transformers import TrainingArguments
    from trl import SFTConfig
    from selfaug.config import USED_BY
    trainer = {f.name for f in dataclasses.fields(TrainingArguments)}
    trl = {f.name for f in dataclasses.fields(SFTConfig)}
    claimed = {new for new, who in USED_BY.items() if "Trainer" in who}
    readme = open(os.path.join(ROOT, "README.md")).read()
    said = re.search(r"the Hugging Face Trainer's names \(([^)]*)\)", readme.replace("\n", " "))
    claimed |= set(re.findall(r"`(\w+)`", said.group(1)))
    assert claimed and claimed <= trainer & trl, claimed - (trainer & trl)
    assert "max_length" in trl and not {"micro_batch_tokens", "num_epochs", "micro_batch_size", "adapter"} & trainer


def test_a_config_saved_by_an_earlier_version_still_loads(tmp_path):
    """selfaug_config.yaml beside an earlier run (eval reads it) holds the old names and a test hook."""
    old = tiny_config(str(tmp_path)).to_dict()
    t = old["train"]
    t["lr"], t["grad_accum"], t["method"], t["optimizer"], t["save_every"] = 0.5, 3, "full", "adamw", 2
    for k in ("learning_rate", "gradient_accumulation_steps", "adapter", "optim", "save_steps"):
        del t[k]
    t["stop_after"] = None
    old["teacher"]["batch_tokens"] = old["teacher"].pop("forward_tokens")
    path = tmp_path / "selfaug_config.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="is now"):
        load_config(str(path))
    cfg = load_config(str(path), saved=True)
    assert (cfg.train.learning_rate, cfg.train.gradient_accumulation_steps, cfg.train.adapter, cfg.train.optim,
            cfg.train.save_steps, cfg.teacher.forward_tokens) == (0.5, 3, "none", "adamw_torch", 2, 2048)


def test_lists_are_yaml_lists_or_comma_strings_and_all_linear_is_peft_s(tmp_path):
    from selfaug.train import lora_config
    a = tiny_config(str(tmp_path), train={"report_to": ["csv"], "lora_target_modules": ["q_proj", "v_proj"]})
    b = build_config(a.to_dict(), ["train.report_to=csv", "train.lora_target_modules=q_proj,v_proj"])
    assert a.train.report_to == b.train.report_to == ["csv"]
    assert a.train.lora_target_modules == b.train.lora_target_modules == ["q_proj", "v_proj"]
    assert set(lora_config(a.train).target_modules) == {"q_proj", "v_proj"}
    every = build_config(a.to_dict(), ["train.lora_target_modules=all-linear"])
    assert lora_config(every.train).target_modules == "all-linear"  # the string peft expands, not ["all-linear"]
    assert build_config(a.to_dict(), ["train.report_to=[]", "train.exit_signals=[]"]).train.exit_signals == []
    with pytest.raises(ConfigError, match="train.report_to: expected a list of strings"):
        build_config(a.to_dict(), ["train.report_to={a: 1}"])


def test_epochs_beside_steps_and_the_wandb_settings(tmp_path, monkeypatch):
    from selfaug.train.metrics import wandb_mode
    cfg = tiny_config(str(tmp_path), train={"max_steps": None, "num_epochs": 2.5, "micro_batch_size": 2,
                                            "gradient_accumulation_steps": 2})
    assert cfg.train.total_steps(40, world=2) == 13  # 40 // 8 = 5 steps an epoch, 2.5 epochs, rounded up
    assert tiny_config(str(tmp_path)).train.total_steps(40, world=2) == 2  # max_steps wins, as in the Trainer
    tc = cfg.train
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(tc) == "offline" and tc.wandb_project == "selfaug"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode(tc) == "online"
    assert wandb_mode(build_config(cfg.to_dict(), ["train.wandb_mode=offline"]).train) == "offline"


def test_config_get_prints_one_resolved_value_and_an_unknown_key_is_one_line(capsys):
    """launch.sh reads train.output_dir this way (its STOP file and the ranks' .exit/ live there)."""
    from selfaug.cli import main
    recipe = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert main(["config", "--config", recipe, "train.output_dir=/x/run", "--get", "train.output_dir"]) == 0
    assert capsys.readouterr().out.strip() == "/x/run"
    assert main(["config", "--config", recipe, "--get", "train.outputdir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such key" in err[0], err


def test_a_transformers_outside_the_tested_range_is_one_line_before_any_model_loads(capsys, monkeypatch):
    """selfaug needs transformers 5's API: with another release the stages stop at once, naming the range."""
    from selfaug import models
    from selfaug.cli import main
    assert models.transformers_outside_range() is None
    assert models.transformers_outside_range("4.56.0") == "4.56.0" and models.transformers_outside_range("6.0") == "6.0"
    assert models.transformers_outside_range("6.0.0rc1") == "6.0.0rc1"  # pip's <6 excludes 6's pre-releases
    assert models.transformers_outside_range("5.26.0.dev0") is None and models.transformers_outside_range("5.25.0+local") is None
    monkeypatch.setattr(models, "transformers_outside_range", lambda: "4.56.0")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["train", "--config", os.path.join(ROOT, "recipes", "tiny.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "selfaug runs with transformers >=5.25,<6; found 4.56.0: pip install" in err[0], err


def test_eval_device_map_takes_accelerates_names_and_a_typo_is_one_line():
    from selfaug.config import ConfigError, load_config
    recipe = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert load_config(recipe, ["eval.device_map=balanced"]).eval.device_map == "balanced"
    with pytest.raises(ConfigError, match="eval.device_map='atuo' is not one of"):
        load_config(recipe, ["eval.device_map=atuo"])


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    """PyYAML keeps the last of two keys silently: a second `train:` section dropped the first one's keys."""
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("model:\n  name_or_path: builtin:tiny-llama\ntrain:\n  learning_rate: 0.01\n"
                      "data:\n  train: builtin:rag\ntrain:\n  alpha: 0.9\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'train' is given twice, on lines 3 and 7"):
        load_config(str(recipe))
    recipe.write_text("model:\n  name_or_path: builtin:tiny-llama\ndata: {train: builtin:rag}\n"
                      "train:\n  alpha: 0.5\n  alpha: 0.9\n")
    with pytest.raises(ConfigError, match=r"key 'alpha' is given twice, on lines 5 and 6"):
        load_config(str(recipe))


def test_order_by_shards_needs_a_store_and_is_one_line_before_any_model_loads():
    recipe = os.path.join(ROOT, "recipes", "tiny.yaml")
    assert load_config(recipe, ["train.order=shards"]).train.order == "shards"
    for mode in ("online", "none"):
        with pytest.raises(ConfigError, match=f"train.order=shards deals a teacher store's shards to the ranks, but "
                                              f"train.teacher_mode={mode} reads the data"):
            load_config(recipe, ["train.order=shards", f"train.teacher_mode={mode}", "train.alpha=0"])
