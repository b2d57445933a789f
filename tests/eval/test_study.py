"""Studies over seeds (docs/design.md, "Studies over seeds"): the statistics on fixed synthetic inputs, the
arms' checks before any work, and a small study of the tiny recipe end to end, resumed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, clean_env, tiny_config, write_recipe
from selfaug.config import ConfigError
from selfaug.eval import stats, study


def test_metric_and_summary_on_known_values():
    assert stats.metric([[1, 1], [0, 1], [1, 1], [1, 1]]) == 0.75
    assert stats.metric([[2, 3], [1, 1]]) == 0.75  # a ratio of sums (instruction level), not a mean of ratios
    s = stats.summary([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["sd"] == pytest.approx(0.2) and s["values"] == [0.2, 0.4, 0.6]
    assert stats.summary([0.5])["sd"] == 0.0


def test_the_paired_bootstrap_interval_matches_the_normal_one_for_a_known_distribution():
    """400 items; the arm is right where the reference is, and on 30 % more: the paired difference is 0.3
    with standard error sqrt(0.3 * 0.7 / 400) = 0.0229, so the 95 % interval is 0.3 +- 0.045."""
    rng = np.random.default_rng(1)
    n = 400
    ref = (rng.random(n) < 0.5).astype(int)
    gain = np.zeros(n, int)
    gain[rng.permutation(np.flatnonzero(ref == 0))[:int(0.3 * n)]] = 1
    arm = ref | gain
    items = lambda v: [[int(x), 1] for x in v]  # noqa: E731
    d = stats.paired_difference([items(arm)], [items(ref)], resamples=4000, seed=0)
    assert d["mean"] == pytest.approx(0.3) and d["excludes_zero"] and d["resamples"] == 4000
    se = np.sqrt(0.3 * 0.7 / n)
    assert d["ci"][0] == pytest.approx(0.3 - 1.96 * se, abs=0.006) and d["ci"][1] == pytest.approx(0.3 + 1.96 * se,
                                                                                                       abs=0.006)
    # the same items for both arms: unpaired resampling would give an interval about 1.6x as wide here
    assert d["ci"][1] - d["ci"][0] < 2 * 1.96 * se * 1.15
    # two seeds: the mean of the seeds' differences; an arm equal to the reference is 0 with a zero interval
    d2 = stats.paired_difference([items(arm), items(ref)], [items(ref), items(ref)], seed=0)
    assert d2["mean"] == pytest.approx(0.15) and d2["ci"][0] < 0.15 < d2["ci"][1]
    same = stats.paired_difference([items(ref)], [items(ref)])
    assert same["mean"] == 0 and same["ci"] == [0, 0] and not same["excludes_zero"]
    assert stats.paired_difference([items(arm)], [items(ref)], seed=0) == stats.paired_difference(
        [items(arm)], [items(ref)], seed=0)  # a fixed bootstrap seed: the same interval every time
    with pytest.raises(ValueError, match="2 seeds against 1"):
        stats.paired_difference([items(arm)] * 2, [items(ref)])


def _study_cfg(tmp, **study_keys):
    return tiny_config(str(tmp), data={"builtin_train_size": 8, "builtin_eval_size": 4},
                       train={"max_steps": 2, "learning_rate": 5e-3},
                       eval={"max_ifeval_prompts": 3, "max_rag_examples": 4, "max_drift_prompts": 2,
                             "max_new_tokens": 8, "rag_max_new_tokens": 6},
                       study={"output_dir": str(tmp / "study"), "seeds": 2, **study_keys})


@pytest.mark.parametrize("arm,message", [
    ({"x": {"train.no_such_key": 1}}, "study arm 'x': unknown key train.no_such_key"),
    ({"x": {"train.drift_budget": 0}}, "study arm 'x': train.drift_budget=0.0 must be > 0"),
    ({"x": {"train.drift_budget": 0.1, "train.alpha_min": 3, "train.alpha_max": 1}},
     "study arm 'x': train.alpha_min=3.0 is above train.alpha_max=1.0"),
    ({"lora": {"train.alpha": 0.1}}, "'lora' is always an arm"),
    ({"x": ["train.alpha=1"]}, "study.arms.x must be a mapping")])
def test_a_bad_arm_is_one_line_before_any_work(tmp_path, arm, message):
    cfg = _study_cfg(tmp_path, arms=arm)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        study.plan(cfg, cfg.to_dict())
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    out = subprocess.run([sys.executable, "-m", "selfaug", "study", "--config", recipe], cwd=ROOT, text=True,
                         capture_output=True, env=clean_env())
    assert out.returncode == 2 and out.stderr.count("selfaug: error:") == 1 and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "study" / "runs")  # nothing trained


def test_a_small_study_of_the_tiny_recipe_end_to_end_and_resumed(tmp_path):
    cfg = _study_cfg(tmp_path, arms={"budget": {"train.drift_budget": 1e-6, "train.drift_horizon": 2.0}})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    cmd = [sys.executable, "-m", "selfaug", "study", "--config", recipe]
    out = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=clean_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "study"
    result = json.load(open(root / "study.json"))
    assert set(result["by_arm"]) == {"lora", "selfaug", "budget"} and result["seeds"] == 2
    assert set(result["metrics"]) == set(study.METRICS)
    report = json.load(open(root / "eval" / "report.json"))
    for arm in ("lora", "selfaug", "budget"):
        for i in range(2):
            name = f"{arm}-seed{i}"
            run_cfg = json.dumps(report["models"][name]["items"])
            assert report["models"][name]["drift_kl"] == pytest.approx(
                stats.metric(report["models"][name]["items"]["drift_kl"]))
            assert result["by_arm"][arm]["drift_kl"]["values"][i] == pytest.approx(report["models"][name]["drift_kl"])
            assert run_cfg
    # the seed changes the run: the two LoRA seeds' adapters differ
    from safetensors.torch import load_file
    a, b = (load_file(root / "runs" / f"lora-seed{i}" / "final" / "adapter_model.safetensors") for i in (0, 1))
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)
    for arm in ("selfaug", "budget"):
        for m in study.METRICS:
            d = result["vs_reference"][arm][m]
            values = result["by_arm"][arm][m]["values"]
            ref = result["by_arm"]["lora"][m]["values"]
            assert d["mean"] == pytest.approx(np.mean(np.subtract(values, ref)), abs=1e-12)
            assert d["ci"][0] <= d["mean"] + 1e-12 and d["mean"] <= d["ci"][1] + 1e-12 and d["resamples"] == 2000
    md = open(root / "study.md").read()
    assert "| selfaug − lora |" in md and "| base |" in md and " ± " in md and "recovers" in md
    assert result["sizes"]["ifeval_prompts"] == 3 and result["sizes"]["drift_texts"] == 2
    assert "Evaluated on 3 IFEval prompts, 4 RAG questions and 2 drift texts" in md
    assert set(result["recovered"]) == {"selfaug", "budget"} and set(result["items_needed"]) == {"selfaug", "budget"}
    times = result["seconds"]
    assert times["cpu_all_sittings"] > 0 and times["wall_all_sittings"] > 0 and len(times["stages"]) == 8
    assert os.path.getsize(root / "study.png") > 5000 and os.path.getsize(root / "study_tradeoff.png") > 5000
    budget_alpha = [json.loads(line)["alpha"] for line in open(root / "runs" / "budget-seed0" / "metrics.jsonl")]
    assert len(budget_alpha) == 2 and budget_alpha[0] == 0.5  # the budget arm's alpha is steered from 0.5
    # resumed: nothing is trained or evaluated again
    again = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=clean_env())
    assert again.returncode == 0 and again.stdout.count("trained already") == 6
    assert "evaluate the base" not in again.stdout and "made already" in again.stdout
    assert json.load(open(root / "study.json"))["by_arm"] == result["by_arm"]


def test_the_recovered_share_and_the_power_calculation_on_known_values():
    """base 0.5, LoRA 0.3 (it lost 0.2), the arm 0.45: it recovers 75 % of the loss; where LoRA gained there is
    nothing to recover; and a difference measured with a standard error of half of it needs (2.8 / 2)^2 = 1.96x
    the items for 80 % power."""
    n = 400
    items = lambda p: [[int(i < p * n), 1] for i in range(n)]  # noqa: E731
    got = stats.recovered_share([items(0.45)], [items(0.3)], items(0.5), resamples=2000, seed=0)
    assert got["share"] == pytest.approx(0.75) and got["ci"][0] < 0.75 < got["ci"][1] and got["lost"] == pytest.approx(0.2)
    assert stats.recovered_share([items(0.45)], [items(0.6)], items(0.5)) is None  # LoRA above the base
    se = 0.05
    assert stats.items_needed({"mean": 0.1, "ci": [0.1 - 1.959964 * se, 0.1 + 1.959964 * se]}) == pytest.approx(1.96)
    assert stats.items_needed({"mean": 0.0, "ci": [-0.1, 0.1]}) is None


def test_the_recovered_share_of_a_metric_where_lower_is_better():
    """Drift: the base is 0, LoRA drifted to 0.4 and the arm to 0.1: it recovers 75 %."""
    kl = lambda v: [[v, 1]] * 50  # noqa: E731
    got = stats.recovered_share([kl(0.1)], [kl(0.4)], kl(0.0), higher_is_better=False)
    assert got["share"] == pytest.approx(0.75)
    assert stats.recovered_share([kl(0.1)], [kl(0.4)], kl(0.0)) is None  # read as a gain, had it been accuracy
