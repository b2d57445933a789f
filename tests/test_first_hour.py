"""A new user's first-hour mistakes (docs/design.md, "Command line"): each ends `selfaug` with exit status 2 and one
line `selfaug: error: ...` that names the fix, never a traceback; a closed pipe ends it quietly."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = os.path.join(ROOT, "recipes", "tiny.yaml")


def one_line(capsys, argv):
    from selfaug.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfaug: error: "), err
    return err[0]


@pytest.mark.parametrize("override,fix", [
    ("train.deepspeed=ds_configs/zero4.json", "train.deepspeed: file 'ds_configs/zero4.json' not found"),
    ("teacher.deepspeed=ds_configs/zero3_inference_x.json", "teacher.deepspeed: file"),
    ("data.train=my_data.jsonl", "data.train: file 'my_data.jsonl' not found"),
    ("data.eval=held_out.parquet", "data.eval: file 'held_out.parquet' not found"),
    ("train.learning_rte=1e-4", "unknown key train.learning_rte; did you mean train.learning_rate?"),
    ("trian.alpha=0.5", "unknown config section 'trian' in override 'trian.alpha=0.5'; did you mean train?"),
    ("eval.device_map=atuo", "is not one of ['auto', 'balanced', 'balanced_low_0', 'sequential']; did you mean auto?"),
])
@pytest.mark.parametrize("command", ["config", "estimate"])
def test_config_and_estimate_check_the_files_and_names_of_a_recipe(capsys, tmp_path, monkeypatch, command, override, fix):
    monkeypatch.chdir(tmp_path)
    assert fix in one_line(capsys, [command, "--config", TINY, override])


@pytest.mark.parametrize("name,fix", [
    ("builtin:tiny-lama", "model.name_or_path=builtin:tiny-lama: unknown built-in model; did you mean builtin:tiny-llama?"),
    ("./my-model", "model.name_or_path=./my-model: no such directory"),
    ("checkpoints/llama/final", "no such directory"),
])
def test_a_model_that_is_not_there_is_one_line(capsys, tmp_path, monkeypatch, name, fix):
    monkeypatch.chdir(tmp_path)
    os.makedirs("checkpoints")  # a local folder: checkpoints/llama/final is a path, not a Hub id
    line = one_line(capsys, ["precompute", "--config", TINY, f"model.name_or_path={name}",
                             f"teacher.output_dir={tmp_path / 'teacher'}"])
    assert fix in line, line


def test_a_base_model_without_a_chat_template_is_one_line_and_model_chat_template_fixes_it(capsys, tmp_path):
    from selfaug.config import ModelConfig
    from selfaug.models import load_tokenizer, load_tokenizer_for
    base = tmp_path / "base"
    tok = load_tokenizer("builtin:tiny-llama")
    template = tok.chat_template
    tok.chat_template = None
    tok.save_pretrained(base)
    line = one_line(capsys, ["precompute", "--config", TINY, f"model.name_or_path={base}",
                             f"teacher.output_dir={tmp_path / 'teacher'}"])
    assert "has no chat template (a base model): set model.chat_template" in line
    (tmp_path / "chat.jinja").write_text(template)
    for given in (str(tmp_path / "chat.jinja"), template):  # a file, or the Jinja itself
        got = load_tokenizer_for(ModelConfig(name_or_path=str(base), chat_template=given))
        assert got.chat_template == template
    line = one_line(capsys, ["precompute", "--config", TINY, f"model.name_or_path={base}",
                             f"model.chat_template={tmp_path / 'chat.jinja2'}", f"teacher.output_dir={tmp_path / 't'}"])
    assert "model.chat_template=" in line and "neither a file nor a Jinja template" in line


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`selfaug config | head`: the reader gone, no BrokenPipeError traceback (128 + SIGPIPE, as a shell reports)."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    proc = subprocess.run([sys.executable, "-m", "selfaug", "config", "--config", TINY], stdout=w,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})  # this checkout's selfaug
    os.close(w)
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr)
