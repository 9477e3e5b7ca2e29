"""Task-sampling schedules: which pre-training tasks are active at a step, and their loss weights.

Every recipe is a pure function of (step, steps per epoch, total epochs, seed): resuming needs
only the step, every rank computes the same answer without communicating, and schedules are
tested without a model.

Recipes:
- ``paper``: the paper's P10+QA10. All tasks with weight 1, but image QA off for the first half of
  the epochs and on for the second half (paper Table 4; 10 + 10 of 20 epochs).
- ``release``: the reference release: every task, weight 1, all epochs.
- ``phased``: the earlier internal variant of SPEC 3: QA weight 0 for the first half, 2 after.
- ``sampled``: one task group per step, drawn by ratio (default language / vision / QA groups).
- ``phases``: user-defined list of phases, each ``{"until_epoch": e, "weights": {task: w}}``.

Tasks with weight 0 are not computed at all (the schedule returns only tasks with weight > 0).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lxtrain.tasks.objectives import TASKS

RECIPES = ("paper", "release", "phased", "sampled", "phases")
NON_QA = tuple(task for task in TASKS if task != "qa")
DEFAULT_GROUPS = {"language": ("mlm", "match"), "vision": ("obj", "attr", "feat"), "qa": ("qa",)}
DEFAULT_GROUP_RATIOS = {"language": 0.4, "vision": 0.4, "qa": 0.2}


@dataclasses.dataclass(frozen=True)
class Phase:
    until_epoch: float
    """The phase covers epochs [previous until_epoch, until_epoch)."""
    weights: Mapping[str, float]
    name: str = ""


@dataclasses.dataclass(frozen=True)
class TaskSchedule:
    """A recipe with its parameters; call ``at(step)`` for the active tasks."""

    recipe: str
    steps_per_epoch: int
    total_epochs: float
    seed: int = 0
    phases: tuple[Phase, ...] = ()
    groups: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GROUPS))
    group_ratios: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GROUP_RATIOS))

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown task recipe {self.recipe!r}; choose one of {RECIPES}")
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0; got {self.steps_per_epoch}")
        if self.recipe == "phases":
            if not self.phases:
                raise ValueError("recipe 'phases' needs at least one phase ({'until_epoch', 'weights'})")
            for phase in self.phases:
                _check_tasks(phase.weights, f"phase {phase.name or phase.until_epoch}")
                if not any(weight > 0 for weight in phase.weights.values()):
                    raise ValueError(f"phase {phase.name or phase.until_epoch}: no task has a weight > 0")
            ends = [phase.until_epoch for phase in self.phases]
            if ends != sorted(ends):
                raise ValueError(f"phases must be ordered by until_epoch; got {ends}")
        if self.recipe == "sampled":
            if set(self.groups) != set(self.group_ratios):
                raise ValueError(
                    f"sampled recipe: groups {sorted(self.groups)} and ratios {sorted(self.group_ratios)} differ"
                )
            for name, tasks in self.groups.items():
                _check_tasks(dict.fromkeys(tasks, 1.0), f"group {name}")
            if any(ratio < 0 for ratio in self.group_ratios.values()) or sum(self.group_ratios.values()) <= 0:
                raise ValueError(
                    f"sampled recipe: ratios must be >= 0 with a positive sum; got {self.group_ratios}"
                )

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def at(self, step: int) -> tuple[str, dict[str, float]]:
        """(phase name, {task: weight}) for optimiser step ``step`` (0-based). Weights are all > 0."""
        epoch = self.epoch_of(step)
        half = self.total_epochs / 2
        if self.recipe == "release":
            return "all-tasks", dict.fromkeys(TASKS, 1.0)
        if self.recipe == "paper":
            if epoch < half:
                return "pretrain-no-qa", dict.fromkeys(NON_QA, 1.0)
            return "pretrain+qa", dict.fromkeys(TASKS, 1.0)
        if self.recipe == "phased":
            if epoch < half:
                return "qa-x0", dict.fromkeys(NON_QA, 1.0)
            return "qa-x2", {**dict.fromkeys(NON_QA, 1.0), "qa": 2.0}
        if self.recipe == "sampled":
            names = sorted(self.groups)
            ratios = np.array([self.group_ratios[name] for name in names], dtype=np.float64)
            # Seeded by (seed, step) alone: the same group on every rank and after a resume.
            rng = np.random.default_rng([self.seed, step])
            group = names[int(rng.choice(len(names), p=ratios / ratios.sum()))]
            return f"group:{group}", dict.fromkeys(self.groups[group], 1.0)
        for index, phase in enumerate(self.phases):
            if epoch < phase.until_epoch or index == len(self.phases) - 1:
                return phase.name or f"phase{index}", {t: w for t, w in phase.weights.items() if w > 0}
        raise AssertionError("unreachable")


def _check_tasks(weights: Mapping[str, float], where: str) -> None:
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {unknown}; known tasks: {list(TASKS)}")
    if any(weight < 0 for weight in weights.values()):
        raise ValueError(f"{where}: task weights must be >= 0; got {dict(weights)}")


def load_phases(path: str | Path) -> tuple[Phase, ...]:
    """Read user-defined phases: a JSON list of {"until_epoch": e, "weights": {task: w}, "name": s}."""
    records: Any = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of phases, found {type(records).__name__}")
    phases = []
    for index, record in enumerate(records):
        missing = {"until_epoch", "weights"} - set(record)
        if missing:
            raise ValueError(f"{path}: phase {index} lacks {sorted(missing)}")
        phases.append(Phase(float(record["until_epoch"]), dict(record["weights"]), record.get("name", "")))
    return tuple(phases)
