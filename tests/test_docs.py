"""The docs say what the code does: the configuration page is the generated one, the README and the docs' cheap
commands (config, estimate, inspect, recipes, --version, help) run as written from a directory outside the
repository, and the relative links between pages resolve."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CONTRIBUTING.md")] + \
    sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
CHEAP = re.compile(r"^(selfaug (config|estimate|inspect|recipes)\b|selfaug --version|\./launch\.sh help)")
MARKER = "<!-- generated below by selfaug/config.py; do not edit -->"


def test_the_configuration_page_is_generated_from_the_schema():
    from selfaug.config import reference
    page = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    assert page[page.index(MARKER) + len(MARKER):].strip() == reference().strip(), \
        "docs/configuration.md is stale: regenerate it (see CONTRIBUTING.md)"


def _commands():
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", open(page).read(), re.S):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if CHEAP.match(line):
                    found.append((os.path.relpath(page, ROOT), line))
    return found


def test_the_docs_cheap_commands_run_as_written(tmp_path):
    """From a fresh directory, as a user who installed selfaug would; a store is made first where a command
    inspects one (the recipes' relative output directories)."""
    commands = _commands()
    assert {c.split()[1] for _, c in commands if c.startswith("selfaug")} >= {"config", "estimate", "inspect", "recipes"}
    exe = os.path.join(os.path.dirname(sys.executable), "selfaug")
    env = clean_env()
    needs_store = {c.split()[2] for _, c in commands if c.startswith("selfaug inspect")}
    for store in needs_store:  # runs/tiny/teacher: the tiny recipe's store, made here first
        assert store == "runs/tiny/teacher", f"the docs inspect {store}: make it in this test first"
        subprocess.run([exe, "precompute", "--config", "recipes/tiny.yaml"], cwd=tmp_path, env=env, check=True,
                       capture_output=True)
    ran = set()
    for page, command in commands:
        if command in ran:  # the same command on two pages runs once
            continue
        ran.add(command)
        argv = shlex.split(command)
        if argv[0] == "selfaug":
            argv[0] = exe
        else:
            argv[0] = os.path.join(ROOT, argv[0])
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{page}: `{command}` exited {out.returncode}:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"


def test_relative_links_between_pages_resolve():
    def anchor(heading):  # GitHub's heading ids
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    for page in PAGES:
        text = open(page).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, frag = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(where), f"{os.path.relpath(page, ROOT)} links to {target}, which does not exist"
            if frag and where.endswith(".md"):
                ids = {anchor(h) for h in re.findall(r"^#+ (.+)$", open(where).read(), re.M)}
                assert frag in ids, f"{os.path.relpath(page, ROOT)} links to #{frag}, no heading of {path or 'itself'}"


def test_launch_sh_help_lists_every_command_and_uses_the_users_python(tmp_path):
    """`./launch.sh help` names every command of its case statement; SELFAUG_PYTHON is the interpreter it runs
    (nothing is installed), and one that cannot import selfaug is one line; `selfaug recipes copy` writes a
    recipe that loads."""
    launch = os.path.join(ROOT, "launch.sh")
    arms = re.findall(r"^  ([a-z|-]+)\)", open(launch).read(), re.M)
    commands = {c for arm in arms for c in arm.split("|") if not c.startswith("-")}
    usage = subprocess.run([launch, "help"], capture_output=True, text=True, check=True).stdout
    assert commands >= {"demo", "test", "all", "study", "gpu-check", "help"}
    assert [c for c in commands if not re.search(rf"\./launch\.sh (\{{[a-z|]*)?{c}\b", usage)] == []
    marker = tmp_path / "used"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ntouch {marker}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    env = clean_env(SELFAUG_PYTHON=str(wrapper))
    used = subprocess.run([launch, "setup"], env=env, check=True, capture_output=True, text=True, timeout=120)
    assert marker.exists() and "setting up" not in used.stderr  # that interpreter, and nothing installed
    wrapper.write_text("#!/bin/sh\nexit 1\n")
    out = subprocess.run([launch, "setup"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "cannot import selfaug" in out.stderr
    exe = os.path.join(os.path.dirname(sys.executable), "selfaug")
    subprocess.run([exe, "recipes", "copy", "recipes/tiny.yaml", str(tmp_path / "mine.yaml")], check=True,
                   capture_output=True, env=clean_env())
    got = subprocess.run([exe, "config", "--config", str(tmp_path / "mine.yaml"), "--get", "model.name_or_path"],
                         check=True, capture_output=True, text=True, env=clean_env()).stdout.strip()
    assert got == "builtin:tiny-llama"


def test_no_recipe_asks_for_more_ifeval_prompts_than_ship():
    """A recipe's eval.max_ifeval_prompts above the shipped prompts would be cut silently (the paper-scale recipes
    asked for 541, all of IFEval, where 271 ship); a recipe with its own eval.ifeval_path is checked against it."""
    import yaml
    from selfaug.schema import EvalConfig
    shipped = os.path.join(ROOT, "selfaug", "eval", "ifeval_dev.jsonl")
    for path in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True):
        ev = (yaml.safe_load(open(path)) or {}).get("eval") or {}
        if "model" not in (yaml.safe_load(open(path)) or {}):
            continue  # not a selfaug recipe (accelerate's config)
        prompts = ev.get("ifeval_path") or shipped
        wanted = ev.get("max_ifeval_prompts", EvalConfig().max_ifeval_prompts)
        available = sum(1 for line in open(os.path.join(ROOT, prompts) if not os.path.isabs(prompts) else prompts)
                        if line.strip())
        assert wanted <= available, f"{os.path.relpath(path, ROOT)}: max_ifeval_prompts {wanted}, {available} ship"
    readme = open(os.path.join(ROOT, "selfaug", "eval", "IFEVAL_README.md")).read()
    named = set(re.findall(r"`([\w.-]+\.jsonl)`", readme))
    assert named and all(os.path.exists(os.path.join(ROOT, "selfaug", "eval", n)) for n in named), named


def test_the_first_days_statements_are_true(tmp_path, monkeypatch, capsys):
    """What install.md, the README, launch.sh and the CLI say: `launch.sh help` is its comment block (not lines of
    the script); the suite's time is CONTRIBUTING.md's figure wherever it is given; selfaug is installed from a
    clone or its wheel (it is on no index); the CPU build of torch is named with its index; `selfaug bench --only`
    lists every section; `selfaug recipes copy` writes the name it is given."""
    usage = subprocess.run([os.path.join(ROOT, "launch.sh"), "help"], capture_output=True, text=True,
                           check=True).stdout
    comments = [line[2:] if line.startswith("# ") else line[1:] for line in
                open(os.path.join(ROOT, "launch.sh")).read().splitlines()[1:] if line.startswith("#")]
    assert usage.splitlines() and all(line in comments for line in usage.splitlines()), usage
    contributing = open(os.path.join(ROOT, "CONTRIBUTING.md")).read()
    pytest_min, ci_min = re.search(r"took ([\d.]+) minutes of pytest \(\d+ s\) and the whole CI run\s+([\d.]+) "
                                   r"minutes", contributing).groups()
    for page in ("README.md", "docs/install.md"):
        text = open(os.path.join(ROOT, page)).read()
        figures = re.findall(r"([\d.~]+) min(?:utes)? of pytest,? (?:on a 2-core CPU, )?([\d.~]+)", text)
        assert figures and set(figures) == {(pytest_min, ci_min)}, (page, figures)
    for page in PAGES + [os.path.join(ROOT, "launch.sh")]:
        for line in open(page).read().splitlines():
            if re.search(r"pip install [^|;]*[\"']?selfaug\[", line):
                assert "--find-links" in line, f"{os.path.relpath(page, ROOT)}: {line.strip()} (selfaug is on no index)"
    install = open(os.path.join(ROOT, "docs", "install.md")).read()
    assert "https://download.pytorch.org/whl/cpu" in install and "a CPU build on a machine without GPUs" not in install
    from selfaug.bench.command import SECTIONS
    from selfaug.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    helped = re.sub(r"\s+", "", capsys.readouterr().out)
    listed = re.search(r"comma-separated:(.*?)--out", helped).group(1)
    assert set(re.findall(r"[a-z]+", listed)) >= set(SECTIONS), listed
    assert set(re.search(r"--only ([a-z,]+)", install).group(1).split(",")) == set(SECTIONS)
    from selfaug import shipped
    monkeypatch.chdir(tmp_path)
    assert shipped.copy("scale/llama3-8b/recipe.yaml", "my8b.yaml") == "my8b.yaml"
    assert sorted(os.listdir(tmp_path)) == ["my8b.yaml"]
    from selfaug.config import load_config
    assert load_config("my8b.yaml").model.name_or_path == "recipes/scale/llama3-8b"  # the shipped shape
