"""alpha from a drift budget (docs/design.md, "α from a drift budget"): the controller on synthetic KL
sequences, its checkpointed state, the recipe's checks, and the loop feeding it the measured KL with every
teacher source."""
import math

import pytest

from conftest import read_metrics, tiny_config
from selfaug import precompute, train
from selfaug.config import ConfigError
from selfaug.train.alpha import ERROR_CLIP, DriftBudget, Schedule, alpha_control


def _controller(**kw):
    args = {"budget": 0.1, "alpha": 0.5, "horizon": 10.0, "alpha_min": 0.01, "alpha_max": 20.0, **kw}
    return DriftBudget(**args)


def _run(control, kls):
    """alpha at each step of `kls` from the controller's own step on, and after the last."""
    alphas = []
    for kl in kls:
        alphas.append(control.at(control.steps))
        control.observe(kl)
    return alphas + [control.at(control.steps)]


def test_above_the_budget_alpha_rises_below_it_falls_and_it_stays_within_its_clip():
    up = _run(_controller(), [0.3] * 40)  # 3x the budget: the error is clipped to +0.2 each step
    assert all(b > a for a, b in zip(up, up[1:]))
    assert up[1] == pytest.approx(0.5 * (1 + ERROR_CLIP / 10))
    assert up[10] == pytest.approx(0.5 * (1 + ERROR_CLIP / 10) ** 10)
    down = _run(_controller(), [0.05] * 40)  # half the budget: error -0.5 -> -0.2
    assert all(b < a for a, b in zip(down, down[1:])) and down[1] == pytest.approx(0.5 * (1 - ERROR_CLIP / 10))
    assert _run(_controller(), [0.1] * 5) == [0.5] * 6  # at the budget: unchanged
    near = _run(_controller(), [0.11])  # +10 %: proportional, under the clip
    assert near[1] == pytest.approx(0.5 * (1 + 0.1 / 10))
    top = _run(_controller(alpha_max=0.6), [1.0] * 100)
    assert max(top) == 0.6 and top[-1] == 0.6
    bottom = _run(_controller(alpha_min=0.4), [0.0] * 100)
    assert min(bottom) == 0.4 and bottom[-1] == 0.4
    assert _controller(alpha=50.0).at(0) == 20.0  # the start is clipped too


def test_on_a_model_whose_drift_falls_with_alpha_it_settles_at_the_budget_without_oscillating():
    """A synthetic run: KL = 0.4 / (1 + alpha) (stronger pull to the base, less drift); the budget 0.1 needs
    alpha = 3. From 0.5 the controller climbs monotonically to it and stays, past the first horizons."""
    control, alphas, kls = _controller(horizon=5.0), [], []
    for step in range(300):
        alpha = control.at(step)
        kl = 0.4 / (1 + alpha)
        alphas.append(alpha), kls.append(kl)
        control.observe(kl)
    assert all(b >= a for a, b in zip(alphas, alphas[1:]))  # no overshoot, no oscillation
    assert alphas[-1] == pytest.approx(3.0, rel=1e-3) and kls[-1] == pytest.approx(0.1, rel=1e-3)
    late = [k / 0.1 - 1 for k in kls[150:]]
    assert max(abs(e) for e in late) < 0.01


def test_the_state_continues_the_same_trajectory():
    kls = [0.3, 0.2, 0.05, 0.12, 0.08, 0.5, 0.1, 0.02, 0.15, 0.11]
    whole = _run(_controller(), kls)
    first = _controller()
    _run(first, kls[:4])
    resumed = _controller()
    resumed.load_state_dict(first.state_dict())
    assert _run(resumed, kls[4:]) == whole[4:]
    with pytest.raises(RuntimeError, match="has seen 0 steps but step 4"):
        _controller().at(4)
    with pytest.raises(ValueError, match="no drift controller state"):
        _controller().load_state_dict(None)
    with pytest.raises(ValueError, match="non-finite"):
        _controller().observe(math.nan)


def test_the_recipe_checks_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError, match=r"train.drift_budget=0.0 must be > 0"):
        tiny_config(str(tmp_path), train={"drift_budget": 0})
    with pytest.raises(ConfigError, match=r"train.drift_budget=-0.1 must be > 0"):
        tiny_config(str(tmp_path), train={"drift_budget": -0.1})
    with pytest.raises(ConfigError, match=r"alpha_min=2.0 is above train.alpha_max=1.0"):
        tiny_config(str(tmp_path), train={"drift_budget": 0.1, "alpha_min": 2.0, "alpha_max": 1.0})
    with pytest.raises(ConfigError, match=r"drop train.alpha_schedule=linear"):
        tiny_config(str(tmp_path), train={"drift_budget": 0.1, "alpha_schedule": "linear"})
    with pytest.raises(ConfigError, match=r"set train.alpha > 0"):
        tiny_config(str(tmp_path), train={"drift_budget": 0.1, "alpha": 0})
    assert isinstance(alpha_control(tiny_config(str(tmp_path)).train, 2), Schedule)
    assert isinstance(alpha_control(tiny_config(str(tmp_path), train={"drift_budget": 0.1}).train, 2), DriftBudget)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_store):
    """The tiny store (top-k) and a sampled and a position-sampled one of the same data."""
    out = {"topk": {"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir}}
    for name, teacher in (("sampled", {"signal": "sampled", "samples": 8}), ("quarter", {"position_fraction": 0.5})):
        tmp = tmp_path_factory.mktemp(name)
        out[name] = {"value_dtype": "float32", **teacher, "output_dir": str(tmp / "teacher")}
        precompute.run(tiny_config(str(tmp), teacher=out[name]))
    return out


@pytest.mark.parametrize("source", ["topk", "sampled", "quarter", "live"])
def test_the_loop_steers_alpha_by_the_measured_kl_with_every_teacher_and_resumes_it(tmp_path, stores, source):
    """With each teacher source the logged alpha follows the rule on the logged (all-reduced) KL; with the
    top-k store, stopped after 3 steps and resumed, the trajectory is the uninterrupted one."""
    budget, horizon = 1e-7, 2.0  # a small budget: the KL of a fine-tuned model exceeds it, alpha must rise
    teacher = stores["topk" if source == "live" else source]
    train_keys = {"max_steps": 6, "drift_budget": budget, "drift_horizon": horizon, "alpha": 0.5, "learning_rate": 5e-2,
                  "teacher_mode": "online" if source == "live" else "offline"}
    rows = read_metrics(train.train(tiny_config(str(tmp_path), teacher=teacher,
                                                train={**train_keys, "output_dir": str(tmp_path / "whole")})))
    control = _controller(budget=budget, horizon=horizon)
    for row in rows:
        assert row["alpha"] == pytest.approx(control.at(row["step"] - 1), rel=1e-12) and row["drift_budget"] == budget
        control.observe(row["kl"])
    assert rows[-1]["alpha"] > rows[0]["alpha"]  # the KL rose above the budget
    if source == "topk":
        run = str(tmp_path / "resumed")
        train.train(tiny_config(str(tmp_path), teacher=teacher, train={**train_keys, "output_dir": run}), stop_after=3)
        resumed = read_metrics(train.train(tiny_config(str(tmp_path), teacher=teacher,
                                                       train={**train_keys, "output_dir": run})))
        assert [r["alpha"] for r in resumed] == pytest.approx([r["alpha"] for r in rows], rel=1e-9)
        with pytest.raises(train.CheckpointError, match="another recipe: drift_budget"):
            train.train(tiny_config(str(tmp_path), teacher=teacher, train={**train_keys, "output_dir": run,
                                                                           "max_steps": 8, "drift_budget": 0.5}))


def test_the_default_horizon_is_a_twentieth_of_the_run_and_a_number_still_wins():
    from selfaug.train.alpha import horizon
    tc = lambda **kw: tiny_config("/tmp/x", train={"drift_budget": 0.02, **kw}).train
    assert tc().drift_horizon == "auto"
    assert [alpha_control(tc(max_steps=n), n).horizon for n in (60, 240, 10, 1)] == [3.0, 12.0, 1.0, 1.0]
    assert alpha_control(tc(max_steps=60, drift_horizon=7), 60).horizon == 7.0
    by_epochs = tc(num_epochs=2.0, max_steps=None)  # 2 epochs of 2400 examples at a global batch of 2: 2400 steps
    assert by_epochs.total_steps(2400, 1) == 2400 and alpha_control(by_epochs, 2400).horizon == 120.0
    assert horizon("auto", 100) == 5.0 and horizon(2.5, 100) == 2.5
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ConfigError, match="train.drift_horizon=.* must be auto or a number of steps > 0"):
            tc(drift_horizon=bad)
    # over a run of n steps, auto lets alpha move e^(0.2 n / (n / 20)) = e^4-fold, at any n
    for n in (60, 240, 1000):
        control = alpha_control(tc(max_steps=n, alpha_max=1000.0), n)
        assert _run(control, [1.0] * n)[-1] == pytest.approx(0.5 * (1 + ERROR_CLIP / (n / 20)) ** n)
        assert 40 < (1 + ERROR_CLIP / (n / 20)) ** n < math.exp(4)
