"""The pre-training meter: the five tasks' losses and accuracies, summed on the device."""

from __future__ import annotations

import torch

from lxtrain.tasks.objectives import TASKS, ObjectiveOutput
from lxtrain.train.meter import StepMeter


class TaskMeter(StepMeter):
    """A :class:`lxtrain.train.meter.StepMeter` over :data:`TASKS`; its own event count is the
    masked-LM labels left out for exceeding the head's capacity."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(TASKS, device)

    def add(self, output: ObjectiveOutput) -> None:
        self.add_values(output.total, output.losses, output.correct, output.counts, output.mlm_over_capacity)
