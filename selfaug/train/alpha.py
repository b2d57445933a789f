"""How α is chosen at each optimizer step (docs/design.md, "α from a drift budget"): one object for the
loop and for `SelfAugTrainer`.

- `Schedule`: `train.alpha`, constant or linear / cosine from `train.alpha_start` (`objective.alpha_at`).
- `DriftBudget` (`train.drift_budget`, nats per KL position): the adaptive KL controller of Ziegler et al.
  (2019), TRL's `AdaptiveKLController`, on the step's mean KL over its prompt positions (the value already
  all-reduced over the ranks, so every rank takes the same α):

      error = clip(KL / budget - 1, -0.2, 0.2);   α <- clip(α (1 + error / horizon), alpha_min, alpha_max)

  starting at `train.alpha`. α rises while the model drifts more than the budget allows and falls while
  it drifts less; `train.drift_horizon` (steps) sets how fast: at most a factor e^(0.2 n / horizon) in n
  steps. `auto` (the default) is a twentieth of the run's optimizer steps, at least 1 (`horizon`): α can then
  move e^4-fold (×55) over the run and e^3-fold by its last quarter, whatever the run's length, where a fixed
  horizon of 10 lets a 60-step run move α only e^1.2-fold and the KL never reaches the budget. Its state (α
  and the steps seen) is part of every checkpoint, so a resumed run, at any world size, continues the same
  trajectory.

`at(step)` is the α of the step about to run; `observe(kl_mean)` follows each step.
"""
from __future__ import annotations

import math

from .objective import alpha_at

ERROR_CLIP = 0.2  # the controller's proportional error is clipped to +-20 % (Ziegler et al.)


class Schedule:
    """α fixed by the recipe (constant, linear or cosine): nothing to observe, no state."""

    def __init__(self, tc, total: int):
        self.tc, self.total = tc, total

    def at(self, step: int) -> float:
        return alpha_at(step, self.tc, self.total)

    def observe(self, kl_mean: float) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class DriftBudget:
    """α steered so that the KL on prompt positions stays near `budget` (see the module docstring)."""

    def __init__(self, budget: float, alpha: float, horizon: float, alpha_min: float, alpha_max: float):
        self.budget, self.horizon, self.alpha_min, self.alpha_max = budget, horizon, alpha_min, alpha_max
        self.alpha = min(max(alpha, alpha_min), alpha_max)
        self.steps = 0  # steps observed: the checkpointed step they must match

    def at(self, step: int) -> float:
        if step != self.steps:
            raise RuntimeError(f"the drift controller has seen {self.steps} steps but step {step} asks for alpha "
                               "(its state was not restored with the checkpoint)")
        return self.alpha

    def observe(self, kl_mean: float) -> None:
        if not math.isfinite(kl_mean):
            raise ValueError(f"the drift controller got a non-finite KL ({kl_mean})")
        error = min(max(kl_mean / self.budget - 1.0, -ERROR_CLIP), ERROR_CLIP)
        self.alpha = min(max(self.alpha * (1.0 + error / self.horizon), self.alpha_min), self.alpha_max)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"kind": "drift_budget", "alpha": self.alpha, "steps": self.steps, "budget": self.budget}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None or state.get("kind") != "drift_budget":
            raise ValueError("the checkpoint has no drift controller state (it was written by a run without "
                             "train.drift_budget)")
        self.alpha, self.steps = float(state["alpha"]), int(state["steps"])


AUTO_FRACTION = 20  # drift_horizon auto: the run's optimizer steps / 20


def horizon(drift_horizon: str | float, total_steps: int) -> float:
    """The controller's horizon in steps: a number as given, or `auto`: max(1, total_steps / 20)."""
    if str(drift_horizon) == "auto":
        return max(1.0, total_steps / AUTO_FRACTION)
    return float(drift_horizon)


def alpha_control(tc, total_steps: int) -> Schedule | DriftBudget:
    """The recipe's choice, made once; `total_steps`: the run's optimizer steps."""
    if tc.drift_budget is None:
        return Schedule(tc, total_steps)
    return DriftBudget(tc.drift_budget, tc.alpha, horizon(tc.drift_horizon, total_steps), tc.alpha_min, tc.alpha_max)
