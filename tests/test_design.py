"""The seams of docs/design.md: no import cycle, stage 2 never imports stage 1, the recipe explains
itself (`selfaug config`), and the metrics reach TensorBoard through DeepSpeed's monitor."""
import ast
import glob
import os

import pytest

from conftest import ROOT, read_metrics, tiny_config
from selfaug import train


def _modules():
    """(name, path) of every module: top-level ones by name, the store package's as store.NAME."""
    for path in sorted(glob.glob(os.path.join(ROOT, "selfaug", "*.py")) + glob.glob(os.path.join(ROOT, "selfaug", "store", "*.py"))):
        base = os.path.basename(path)[:-3]
        in_store = os.path.basename(os.path.dirname(path)) == "store"
        yield (("store" if base == "__init__" else f"store.{base}") if in_store else base), path


def _imports() -> dict:
    """module -> the selfaug modules it imports, at module level or inside functions (the store package
    counts as one module, `store`, that imports its own)."""
    graph = {}
    for name, path in _modules():
        package = "store" if name.startswith("store") else ""
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1 and package:  # inside the store package
                deps.update([f"store.{node.module}"] if node.module else [f"store.{a.name}" for a in node.names])
            elif node.level == 1 or (node.level == 2 and package):
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif (node.module or "").startswith("selfaug."):
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
    assert {"train", "reader", "precompute", "store", "store.signals", "store.writer", "loss"} <= set(graph)
    # the package imports its modules; none of them imports the package back
    inner = {m: deps - {"store"} for m, deps in graph.items()}
    cycles = [m for m in inner if m in _closure(inner, m)]
    assert cycles == [], f"modules on an import cycle: {cycles}"
    assert not any("store" in graph[m] for m in graph if m.startswith("store."))
    for stage2 in ("reader", "train"):
        assert "precompute" not in _closure(graph, stage2), f"{stage2} reaches precompute"
    assert "bench" not in _closure(graph, "bench_worker")  # bench drives, its worker never imports it back


def test_every_module_points_to_a_heading_of_the_design_document():
    import re
    design = open(os.path.join(ROOT, "docs", "design.md")).read()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", design, re.M)}
    for name, path in _modules():
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        if os.path.basename(path) in ("__main__.py",) or (name.endswith("__init__") or name == "__init__"):
            continue
        cited = re.findall(r'docs/design\.md, "([^"]+)"', doc)
        assert cited, f"{path}: its docstring does not cite a section of docs/design.md"
        for section in cited:
            assert section in headings, f"{path} cites \"{section}\", which is no heading of docs/design.md"
    assert os.path.getsize(os.path.join(ROOT, "docs", "design.md")) > 5000


def test_only_the_config_and_the_signal_module_name_a_signal():
    """One object per signal: no other module compares signal names or probes a signal's columns."""
    for name, path in _modules():
        if name in ("config", "store.signals"):
            continue
        text = open(path).read()
        for word in ('"topk"', '"sampled"', "'topk'", "'sampled'", '"topk_ids"', '"sample_ids"'):
            assert word not in text, f"{path} names {word}: ask the store's signal object instead"


def test_no_module_is_over_500_lines():
    for name, path in _modules():
        n = sum(1 for _ in open(path))
        assert n <= 500, f"{path} has {n} lines: it is doing two jobs"


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
