"""Fault injection for the fault-tolerance suite, as :class:`lxtrain.train.loop.StepHooks`.

``lxtrain/testing/pretrain_with_faults.py`` (what ``lxtrain.testing.faults`` launches when a
scenario injects one of these) builds :class:`FaultHooks` from the environment; ``lxtrain/pretrain.py``
itself never reads these variables. Each takes a comma-separated list of whole numbers:

- ``LXTRAIN_FAULT_SIGKILL_AT_STEP``: SIGKILL the rank right after optimiser step N (once the step
  is logged, before its checkpoint);
- ``LXTRAIN_FAULT_SIGKILL_IN_SAVE``: SIGKILL the rank while it saves the checkpoint of step N
  (every rank's files written, the ``COMPLETE`` marker not yet);
- ``LXTRAIN_FAULT_NAN_AT_BATCH``: replace the loss of micro-batch N (counted from 0 since the
  start of training) with NaN.

``LXTRAIN_FAULT_RANK`` restricts them to that rank (unset or empty: every rank). Each fault first
prints a line ``lxtrain fault injection: ... at <unix time>``, which the suite times detection from.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Mapping

import torch.distributed as dist

from lxtrain.tasks.objectives import ObjectiveOutput
from lxtrain.train.loop import StepHooks

FAULT_SIGKILL_AT_STEP = "LXTRAIN_FAULT_SIGKILL_AT_STEP"
FAULT_SIGKILL_IN_SAVE = "LXTRAIN_FAULT_SIGKILL_IN_SAVE"
FAULT_NAN_AT_BATCH = "LXTRAIN_FAULT_NAN_AT_BATCH"
FAULT_RANK = "LXTRAIN_FAULT_RANK"
FAULT_VARIABLE_PREFIX = "LXTRAIN_FAULT_"  # a launch whose environment sets one of these injects a fault
FAULT_LOG_PREFIX = "lxtrain fault injection:"  # what lxtrain.testing.faults reads to time the detection


def parse_numbers(variable: str, environ: Mapping[str, str]) -> frozenset[int]:
    """The comma-separated whole numbers of ``variable`` (none when unset or empty).

    A malformed value raises instead of injecting nothing: a scenario whose fault silently never
    fires would pass for the wrong reason, or fail far from the typo.
    """
    text = environ.get(variable, "")
    numbers = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            numbers.add(int(item))
        except ValueError:
            raise ValueError(f"{variable}={text!r}: {item!r} is not a whole number") from None
    return frozenset(numbers)


def current_rank() -> int:
    """This process's rank: the hooks run inside the loop, after ``distributed.init`` (which
    starts a process group under every launcher, a single process included)."""
    return dist.get_rank() if dist.is_initialized() else 0


def kill_self(what: str) -> None:
    """SIGKILL this rank, first leaving a timestamped line for the fault suite's timing."""
    rank = current_rank()
    print(f"{FAULT_LOG_PREFIX} SIGKILL rank {rank} {what} at {time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class FaultHooks(StepHooks):
    """The faults of one run: steps to die after or while saving, micro-batches whose loss is NaN.

    ``step_begins`` and ``step_ends`` stay StepHooks' no-ops: no fault needs them.
    """

    sigkill_at_step: frozenset[int] = frozenset()
    sigkill_in_save: frozenset[int] = frozenset()
    nan_at_batch: frozenset[int] = frozenset()
    rank: int | None = None  # the only rank the faults hit; None: every rank

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> FaultHooks:
        """The faults the ``LXTRAIN_FAULT_*`` variables ask for (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        rank_text = env.get(FAULT_RANK, "").strip()
        try:
            rank = int(rank_text) if rank_text else None
        except ValueError:
            raise ValueError(f"{FAULT_RANK}={rank_text!r} is not a rank number") from None
        return cls(
            sigkill_at_step=parse_numbers(FAULT_SIGKILL_AT_STEP, env),
            sigkill_in_save=parse_numbers(FAULT_SIGKILL_IN_SAVE, env),
            nan_at_batch=parse_numbers(FAULT_NAN_AT_BATCH, env),
            rank=rank,
        )

    def _here(self, numbers: frozenset[int], value: int) -> bool:
        # The rank is looked up only once a number matches: the common case is one set lookup.
        return value in numbers and (self.rank is None or self.rank == current_rank())

    def after_forward(self, batches_done: int, output: ObjectiveOutput) -> None:
        if self._here(self.nan_at_batch, batches_done):
            print(f"{FAULT_LOG_PREFIX} NaN loss at micro-batch {batches_done} at {time.time():.3f}")
            # Multiplied rather than replaced by a constant: the NaN total keeps its autograd graph,
            # so where the engine skips non-finite steps itself backward yields NaN gradients, as a
            # real overflow would.
            output.total = output.total * float("nan")

    def step_logged(self, step: int) -> None:
        if self._here(self.sigkill_at_step, step):
            kill_self(f"after step {step}")

    def before_checkpoint_complete(self, step: int) -> None:
        if self._here(self.sigkill_in_save, step):
            kill_self(f"while saving step {step}")
