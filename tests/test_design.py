"""The seams of docs/design.md: no import cycle, stage 2 never imports stage 1, the recipe explains
itself (`selfaug config`), and the metrics reach TensorBoard through DeepSpeed's monitor."""
import ast
import glob
import os

import pytest

from conftest import ROOT, read_metrics, tiny_config
from selfaug import train


def _imports() -> dict:
    """module -> the selfaug modules it imports, at module level or inside functions."""
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "selfaug", "*.py")):
        name = os.path.basename(path)[:-3]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfaug."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
    return graph


def _closure(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycle_and_stage_2_does_not_import_stage_1():
    graph = _imports()
    assert {"train", "reader", "precompute", "teacher_store", "loss"} <= set(graph)
    cycles = [m for m in graph if m in _closure(graph, m)]
    assert cycles == [], f"modules on an import cycle: {cycles}"
    for stage2 in ("reader", "train"):
        assert "precompute" not in _closure(graph, stage2), f"{stage2} reaches precompute"
    assert "bench" not in _closure(graph, "bench_worker")  # bench drives, its worker never imports it back


def test_every_module_points_to_the_design_document():
    for path in glob.glob(os.path.join(ROOT, "selfaug", "*.py")):
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        if os.path.basename(path) not in ("__init__.py", "__main__.py"):
            assert "docs/design.md" in doc, f"{path}: its docstring does not point to docs/design.md"
    assert os.path.getsize(os.path.join(ROOT, "docs", "design.md")) > 5000


def test_selfaug_config_prints_the_resolved_recipe_with_help(capsys):
    from selfaug.cli import main
    assert main(["config", os.path.join(ROOT, "recipes", "tiny.yaml"), "train.alpha=0.25"]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.strip().startswith("alpha:")][0]
    assert "0.25" in line and "weight of the KL term" in line and ">= 0" in line
    assert "[forward | reverse]" in out  # a Literal's allowed values, from the field itself


def test_report_to_tensorboard_writes_every_metric_of_every_step(tmp_path, tiny_store):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 3, "report_to": "tensorboard,csv"})
    out = train.train(cfg)
    files = glob.glob(os.path.join(out, "logs", "tensorboard", "events.out.tfevents.*"))
    assert files, os.listdir(os.path.join(out, "logs"))
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    metrics = read_metrics(out)
    for key in ("loss", "nll", "kl", "alpha", "lr", "tokens_per_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3], key
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6), key
    assert glob.glob(os.path.join(out, "logs", "csv", "*.csv"))
