"""`selfaug study` / `launch.sh study RECIPE` (docs/design.md, "Studies over seeds"): every arm under every
seed, evaluated once, with spreads and paired confidence intervals.

Arms: `lora` (the recipe at train.alpha=0), `selfaug` (the recipe as it is) and `study.arms`
({name: {section.key: value}}, e.g. a drift budget or a sampled store). Seed i sets train.seed to the
recipe's + i. Under `study.output_dir`:

  recipes/<arm>-seed<i>.yaml   each run's whole recipe (built first: a bad arm is one line before any work)
  teacher[-<arm>]/             one store per distinct teacher setting (arms that change none share it)
  runs/<arm>-seed<i>/          each training run
  eval/report.json             one `selfaug eval` of the base and every run (per-item scores included)
  eval/models/<name>.json      each model's scores, kept as soon as it is evaluated
  times.json                   wall and CPU seconds of every stage, added up over sittings
  study.json, study.md, study.png, study_tradeoff.png

It resumes: a store it finished is not computed again, a run with its final model is not trained again (one with a
checkpoint continues from it), and the evaluation scores only the models it has not scored (`selfaug eval` keeps
each model's scores), so a study can run over several sittings. study.md gives, beside each difference from LoRA,
the share of what LoRA lost from the base that the arm recovers, and where an interval contains 0 how many more
evaluated items a power calculation from the observed spread says would show the difference.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import yaml

from .. import locks, store
from ..config import Config, ConfigError, build_config, config_digest, load_yaml
from ..durable import is_complete, write_atomic
from . import stats

REFERENCE = "lora"
LOWER_IS_BETTER = ("drift_kl",)
# metric key in a report's per-item scores: its label
METRICS = {"rag_accuracy": "RAG accuracy", "rag_strict_accuracy": "RAG accuracy, strict",
           "ifeval_strict_prompt": "IFEval strict, prompt", "ifeval_strict_instruction": "IFEval strict, instruction",
           "ifeval_loose_prompt": "IFEval loose, prompt", "ifeval_loose_instruction": "IFEval loose, instruction",
           "drift_kl": "drift KL(base ‖ model)"}


def arms(cfg: Config) -> dict[str, dict]:
    """{name: overrides}: lora, selfaug, then study.arms in their order."""
    out = {REFERENCE: {"train.alpha": 0.0}, "selfaug": {}}
    extra = cfg.study.arms or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"study.arms must be a mapping {{name: {{section.key: value}}}}, got {extra!r}")
    for name, overrides in extra.items():
        if name in out:
            raise ConfigError(f"study.arms: {name!r} is always an arm; give the extra arm another name")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"study.arms: the arm name {name!r} must be letters, digits, - and _")
        if not isinstance(overrides, dict) or any(not isinstance(k, str) or "." not in k for k in overrides):
            raise ConfigError(f"study.arms.{name} must be a mapping of section.key: value, got {overrides!r}")
        out[name] = dict(overrides)
    return out


def plan(cfg: Config, raw: dict) -> dict[tuple[str, int], Config]:
    """Every run's recipe, keyed by (arm, seed index), from the recipe's own mapping plus the arm's keys."""
    root = cfg.study.output_dir
    runs = {}
    for name, overrides in arms(cfg).items():
        teacher = "teacher" if not any(k.startswith("teacher.") for k in overrides) else f"teacher-{name}"
        for i in range(cfg.study.seeds):
            items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
            items += [f"teacher.output_dir={os.path.join(root, teacher)}",
                      f"train.output_dir={os.path.join(root, 'runs', f'{name}-seed{i}')}",
                      f"train.seed={cfg.train.seed + i}", f"eval.output_dir={os.path.join(root, 'eval')}"]
            try:
                runs[(name, i)] = build_config(raw, items)
            except ConfigError as e:
                raise ConfigError(f"study arm {name!r}: {e}") from None
    return runs


def _launcher() -> list[str]:
    """How a stage is started: $SELFAUG_LAUNCHER (launch.sh sets itself: `launch.sh STAGE RECIPE`, through
    the deepspeed launcher on every GPU), else one process of this Python."""
    launcher = os.environ.get("SELFAUG_LAUNCHER")
    return shlex.split(launcher) if launcher else [sys.executable, "-m", "selfaug"]


def _cpu() -> float:
    """CPU seconds of every finished child process (and theirs: each waits for its own)."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stage(stage: str, recipe: str, times: dict, label: str) -> None:
    """One stage as its own process; its wall and CPU seconds kept in `times` (saved by the caller, so that a
    study run over several sittings adds them up)."""
    cmd = _launcher()
    cmd += [stage, recipe] if os.path.basename(cmd[0]) == "launch.sh" else [stage, "--config", recipe]
    print(f"study: {label}: {' '.join(cmd)}", flush=True)
    t0, c0 = time.time(), _cpu()
    code = subprocess.run(cmd).returncode
    wall, cpu = times.get(label, [0.0, 0.0])  # an interrupted stage run again: both attempts count
    times[label] = [wall + time.time() - t0, cpu + _cpu() - c0]
    _save_times(times)
    if code != 0:
        raise StudyError(f"{label} failed (exit status {code}); fix it and run the study again: finished stores, "
                         "runs and checkpoints are kept")


def _save_times(times: dict) -> None:
    path = times.get("_path")
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps({k: v for k, v in times.items() if k != "_path"}, indent=2))


class StudyError(ConfigError):
    """A stage of the study failed (the message names it)."""


def _trained(cfg: Config) -> bool:
    """The run has its whole final model (`final/COMPLETE`), trained from this recipe (another run in the directory is
    an error)."""
    saved = os.path.join(cfg.train.output_dir, "final", "selfaug_config.yaml")
    if not is_complete(os.path.dirname(saved)):
        return False
    with open(saved) as f:
        old = yaml.safe_load(f)
    new = cfg.to_dict()
    same = all(old.get(s) == new[s] for s in ("model", "data")) and all(
        {k: v for k, v in (old.get(s) or {}).items() if k != "output_dir"} ==
        {k: v for k, v in new[s].items() if k != "output_dir"} for s in ("teacher", "train"))
    if not same:
        raise StudyError(f"{cfg.train.output_dir} holds a run of another recipe: remove it, or choose another "
                         "study.output_dir")
    return True


def run(cfg: Config, recipe_path: str, overrides: list[str]) -> dict:
    """The study, holding study.output_dir (one job per directory: a second study there is refused)."""
    lock = locks.DirLock(cfg.study.output_dir, "study").acquire()
    try:
        return _study(cfg, recipe_path, overrides)
    finally:
        lock.release()


def _study(cfg: Config, recipe_path: str, overrides: list[str]) -> dict:
    with open(recipe_path) as f:
        raw = load_yaml(f) or {}
    raw = build_config(raw, overrides).to_dict()  # the recipe with the command line's keys
    runs = plan(cfg, raw)
    root = cfg.study.output_dir
    for (name, i), run_cfg in runs.items():
        run_cfg.save(os.path.join(root, "recipes", f"{name}-seed{i}.yaml"))
    times_path = os.path.join(root, "times.json")  # wall and CPU seconds of each stage, over every sitting
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    times["_path"] = times_path
    t0 = time.time()
    stores = {}
    for key, run_cfg in runs.items():  # one store per teacher directory, made by its first run's recipe
        stores.setdefault(run_cfg.teacher.output_dir, key)
    made_path = os.path.join(root, "stores.json")  # the stores this study finished, by their recipe's digest
    made = json.load(open(made_path)) if os.path.isfile(made_path) else {}
    for where, key in stores.items():
        run_cfg = runs[key]
        digest = config_digest({s: run_cfg.to_dict()[s] for s in ("model", "data", "teacher")})
        if made.get(where) == digest and _complete(where):
            print(f"study: store {where}: made already", flush=True)
            continue
        _stage("precompute", os.path.join(root, "recipes", f"{key[0]}-seed{key[1]}.yaml"), times, f"store {where}")
        made[where] = digest
        write_atomic(made_path, json.dumps(made, indent=2))
    for n, ((name, i), run_cfg) in enumerate(runs.items(), 1):
        if _trained(run_cfg):
            print(f"study: [{n}/{len(runs)}] {name} seed {i}: trained already", flush=True)
            continue
        _stage("train", os.path.join(root, "recipes", f"{name}-seed{i}.yaml"), times,
               f"[{n}/{len(runs)}] train {name} seed {i}")
    report_path = os.path.join(root, "eval", "report.json")
    names = [os.path.basename(c.train.output_dir) for c in runs.values()]
    if not _evaluated(report_path, names):
        first = next(iter(runs.values()))
        every = [c.train.output_dir for c in runs.values()]
        eval_recipe = os.path.join(root, "recipes", "eval.yaml")
        build_config(first.to_dict(), [f"eval.runs={json.dumps(every)}"]).save(eval_recipe)
        _stage("eval", eval_recipe, times, "evaluate the base and every run")
    with open(report_path) as f:
        report = json.load(f)
    result = summarize(report, {k: os.path.basename(c.train.output_dir) for k, c in runs.items()}, cfg.study)
    stages = {k: v for k, v in times.items() if k != "_path"}
    result["seconds"] = {"total_this_invocation": time.time() - t0,
                         "wall_all_sittings": sum(w for w, _ in stages.values()),
                         "cpu_all_sittings": sum(c for _, c in stages.values()), "stages": stages}
    result["arms"] = arms(cfg)
    write(result, root)
    print(format_markdown(result), flush=True)
    return result


def _complete(store_dir: str) -> bool:
    try:
        return store.read_manifest(store_dir).get("status") == "complete"
    except store.StoreError:
        return False


def _evaluated(path: str, names: list[str]) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        models = json.load(f).get("models", {})
    return all(n in models and "items" in models[n] for n in names) and "items" in models.get("base", {})


def summarize(report: dict, names: dict, sc) -> dict:
    """study.json's content from a report: names maps (arm, seed index) to the report's model name."""
    models = report["models"]
    arm_names = list(dict.fromkeys(a for a, _ in names))
    seeds = sorted({i for _, i in names})
    items = {(a, i): models[n]["items"] for (a, i), n in names.items()}
    present = [m for m in METRICS if m in models["base"]["items"]]
    out = {"seeds": len(seeds), "reference": REFERENCE, "metrics": {m: METRICS[m] for m in present},
           "sizes": report.get("sizes", {}),
           "base": {m: stats.metric(models["base"]["items"][m]) for m in present}, "by_arm": {}, "vs_reference": {},
           "recovered": {}, "items_needed": {}}
    for a in arm_names:
        out["by_arm"][a] = {m: stats.summary([stats.metric(items[(a, i)][m]) for i in seeds]) for m in present}
        if a == REFERENCE:
            continue
        arm_items = {m: [items[(a, i)][m] for i in seeds] for m in present}
        ref_items = {m: [items[(REFERENCE, i)][m] for i in seeds] for m in present}
        out["vs_reference"][a] = {m: stats.paired_difference(arm_items[m], ref_items[m], sc.resamples,
                                                             sc.bootstrap_seed) for m in present}
        out["recovered"][a] = {m: stats.recovered_share(arm_items[m], ref_items[m], models["base"]["items"][m],
                                                        sc.resamples, sc.bootstrap_seed,
                                                        higher_is_better=m not in LOWER_IS_BETTER) for m in present}
        out["items_needed"][a] = {m: stats.items_needed(d) for m, d in out["vs_reference"][a].items()
                                  if not d["excludes_zero"]}
    return out


def format_markdown(result: dict) -> str:
    metrics = result["metrics"]
    lines = [f"Over {result['seeds']} seeds per arm: mean ± standard deviation of the seeds' values.", "",
             "| arm | " + " | ".join(metrics.values()) + " |", "|---|" + "---|" * len(metrics),
             "| base | " + " | ".join(f"{result['base'][m]:.3f}" for m in metrics) + " |"]
    for a, row in result["by_arm"].items():
        lines.append(f"| {a} | " + " | ".join(f"{row[m]['mean']:.3f} ± {row[m]['sd']:.3f}" for m in metrics) + " |")
    lines += ["", f"Difference from {result['reference']}, paired by seed and evaluation item, with its 95 % "
                  f"bootstrap interval:", "", "| arm | " + " | ".join(metrics.values()) + " |",
              "|---|" + "---|" * len(metrics)]
    words = []
    for a, row in result["vs_reference"].items():
        lines.append(f"| {a} − {result['reference']} | " + " | ".join(
            f"{row[m]['mean']:+.3f} [{row[m]['ci'][0]:+.3f}, {row[m]['ci'][1]:+.3f}]" for m in metrics) + " |")
        zero = [metrics[m] for m in metrics if not row[m]["excludes_zero"]]
        if zero:
            words.append(f"- {a}: the interval contains 0 for {', '.join(zero)}: no difference from "
                         f"{result['reference']} is shown there at this number of seeds and items.")
        for m, times in result.get("items_needed", {}).get(a, {}).items():
            if times is not None:
                words.append(f"  - {metrics[m]}: at the observed difference ({row[m]['mean']:+.3f}) and spread, about "
                             f"{times:.1f}× the evaluated items (prompts × seeds) would give a two-sided 5 % test "
                             "80 % power (the items' standard error only; seed-to-seed variance adds to it).")
    recovered = result.get("recovered", {})
    if recovered:
        lines += ["", f"Share of what {result['reference']} lost from the base that the arm recovers, "
                      f"(arm − {result['reference']}) / (base − {result['reference']}), with its 95 % bootstrap "
                      f"interval (– where {result['reference']} did not lose):", "",
                  "| arm | " + " | ".join(metrics.values()) + " |", "|---|" + "---|" * len(metrics)]
        for a, row in recovered.items():
            cells = ["–" if row.get(m) is None else
                     f"{row[m]['share']:.0%} [{row[m]['ci'][0]:.0%}, {row[m]['ci'][1]:.0%}]" for m in metrics]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    sizes = result.get("sizes") or {}
    if sizes:
        lines += ["", f"Evaluated on {sizes.get('ifeval_prompts')} IFEval prompts, {sizes.get('rag_questions')} RAG "
                      f"questions and {sizes.get('drift_texts')} drift texts ({sizes.get('drift_positions')} positions, "
                      f"the base's top {sizes.get('drift_k')} stored), {result['seeds']} seeds per arm."]
    return "\n".join(lines + ([""] + words if words else []))


def write(result: dict, root: str) -> None:
    os.makedirs(root, exist_ok=True)
    # each whole or not at all: a study stopped here keeps the previous study.json and study.md
    write_atomic(os.path.join(root, "study.json"), json.dumps(result, indent=2))
    write_atomic(os.path.join(root, "study.md"), format_markdown(result) + "\n")
    from .plots import plot_study, plot_study_tradeoff
    plot_study(result, root)
    plot_study_tradeoff(result, root)
