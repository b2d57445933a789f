"""The seams of docs/design.md: no import cycle, stage 2 never imports stage 1, the recipe explains
itself (`selfaug config`), and the metrics reach TensorBoard through DeepSpeed's monitor."""
import ast
import glob
import json
import os

import pytest

from conftest import ROOT, read_metrics, tiny_config
from selfaug import train


PACKAGES = ("store", "train", "data", "eval", "hf", "bench")  # one concern a folder


def _modules():
    """(name, path) of every module: top-level ones by name, a package's as PACKAGE.NAME (its
    __init__ as PACKAGE)."""
    paths = glob.glob(os.path.join(ROOT, "selfaug", "*.py")) + glob.glob(os.path.join(ROOT, "selfaug", "*", "*.py"))
    for path in sorted(paths):
        base = os.path.basename(path)[:-3]
        package = os.path.basename(os.path.dirname(path))
        if package == "selfaug":
            yield base, path
        else:
            yield (package if base == "__init__" else f"{package}.{base}"), path


def _imports() -> dict:
    """module -> the selfaug modules it imports, at module level or inside functions: each import resolved
    to its absolute name, named as `_modules` names them (a package's module PACKAGE.NAME, a name
    imported from a package's __init__ the package itself)."""
    names = {name for name, _ in _modules()}

    def known(parts: list[str]) -> str:
        for n in (len(parts), 2, 1):
            if ".".join(parts[:n]) in names:
                return ".".join(parts[:n])
        return parts[0]

    graph = {}
    for name, path in _modules():
        here = name.split(".") if name in PACKAGES else name.split(".")[:-1]  # the importing package's path
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                mod = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("selfaug."):
                mod = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or (mod and ".".join(mod) in PACKAGES and not node.module):
                deps.update(known(mod + [a.name]) for a in node.names)
            else:
                deps.add(known(mod) if mod else known([a.name for a in node.names][:1]))
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


def test_the_tree_shows_the_stages_and_the_concerns():
    top = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "selfaug", "*"))} - {"__pycache__"}
    assert {"precompute.py", "loss.py", "train", "store", "data", "eval", "hf", "bench"} <= top
    for package in PACKAGES:  # each folder says what it owns
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "selfaug", package, "__init__.py")).read()))
        assert doc and len(doc.splitlines()) >= 3, f"selfaug/{package}/__init__.py does not say what it owns"
    names = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "selfaug", "**", "*.py"), recursive=True)
             if not p.endswith("__init__.py")]
    assert len(names) == len(set(names)), f"two modules share a name: {sorted(n for n in names if names.count(n) > 1)}"
    stems = {n[:-3] for n in names}
    folders = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "selfaug", "*")) if os.path.isdir(p)}
    assert not (stems & folders), f"a module has a folder's name: {stems & folders}"


def test_no_import_cycle_and_stage_2_does_not_import_stage_1():
    graph = _imports()
    assert {"train.loop", "train.sources", "precompute", "store", "store.signals", "store.writer", "loss"} <= set(graph)
    # a package imports its modules; none of them imports its own package back
    inner = {m: deps - set(PACKAGES) for m, deps in graph.items()}
    cycles = [m for m in inner if m in _closure(inner, m)]
    assert cycles == [], f"modules on an import cycle: {cycles}"
    for m in graph:
        if "." in m:
            assert m.split(".")[0] not in graph[m], f"{m} imports its own package"
    for stage2 in ("train", "train.loop", "train.sources", "train.batches"):
        assert "precompute" not in _closure(graph, stage2), f"{stage2} reaches precompute"


def test_nothing_but_the_command_line_imports_the_benchmarks():
    graph = _imports()
    users = sorted(m for m, deps in graph.items() if not m.startswith("bench") and m != "cli"
                   and any(d == "bench" or d.startswith("bench.") for d in deps))
    assert users == [], f"product modules import selfaug.bench: {users}"
    assert "bench.command" not in _closure(graph, "bench.worker")  # the command drives, its worker never imports it


def test_every_module_points_to_a_heading_of_the_design_document():
    import re
    design = open(os.path.join(ROOT, "docs", "design.md")).read()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", design, re.M)}
    for name, path in _modules():
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        if os.path.basename(path) in ("__main__.py", "__init__.py"):
            continue
        cited = re.findall(r'docs/design\.md, "([^"]+)"', doc)
        assert cited, f"{path}: its docstring does not cite a section of docs/design.md"
        for section in cited:
            assert section in headings, f"{path} cites \"{section}\", which is no heading of docs/design.md"
    assert os.path.getsize(os.path.join(ROOT, "docs", "design.md")) > 5000


def test_only_the_config_and_the_signal_module_name_a_signal():
    """One object per signal: no other module compares signal names or probes a signal's columns."""
    for name, path in _modules():
        if name in ("config", "schema", "store.signals"):
            continue
        text = open(path).read()
        for word in ('"topk"', '"sampled"', "'topk'", "'sampled'", '"topk_ids"', '"sample_ids"'):
            assert word not in text, f"{path} names {word}: ask the store's signal object instead"


def test_no_module_is_over_450_lines():
    for name, path in _modules():
        n = sum(1 for _ in open(path))
        assert n <= 450, f"{path} has {n} lines: it is doing two jobs"


def test_selfaug_config_prints_the_resolved_recipe_with_help(capsys):
    from selfaug.cli import main
    assert main(["config", "--config", os.path.join(ROOT, "recipes", "tiny.yaml"), "train.alpha=0.25"]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.strip().startswith("alpha:")][0]
    assert "0.25" in line and "weight of the KL term" in line and ">= 0" in line
    assert "[forward | reverse]" in out  # a Literal's allowed values, from the field itself


def test_report_to_tensorboard_csv_and_wandb_write_every_metric_of_every_step(tmp_path, tiny_store, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 3, "report_to": "tensorboard,csv,wandb"})
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
    (run_file,) = glob.glob(os.path.join(out, "logs", "wandb", "offline-run-*", "run-*.wandb"))
    history = _wandb_history(run_file)
    for key in ("loss", "nll", "kl", "alpha", "lr", "tokens_per_s"):
        logged = sorted((step, v) for step, row in history.items() for k, v in row.items() if k == key)
        assert [step for step, _ in logged] == [1, 2, 3], key
        assert [v for _, v in logged] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


def _wandb_history(path: str) -> dict:
    """{step: {key: value}} of a W&B run file (offline mode): a LevelDB-style log of protobuf records
    after W&B's 7-byte header, in 32 KiB blocks, each record chunk behind a 7-byte header (crc, length,
    type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, records, chunks = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
        elif kind == 0 and length == 0:
            break
    history = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = record.history.step.num if record.history.HasField("step") else items.get("_step")
            history.setdefault(int(step), {}).update(items)
    return history


def test_a_logger_that_is_not_installed_is_one_line_naming_its_extra(monkeypatch):
    import importlib.util
    from selfaug.config import ConfigError, load_config
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'train.report_to=wandb needs the wandb package.*pip install wandb \(the extra '
                                          r'selfaug\[wandb\]'):
        load_config(os.path.join(ROOT, "recipes", "tiny.yaml"), ["train.report_to=csv,wandb"])
