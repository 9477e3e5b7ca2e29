"""TaskMeter: per-task sums and non-finite runs kept on the device, reduced over ranks at log steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lxtrain.tasks.meter import TaskMeter
from lxtrain.tasks.objectives import ObjectiveOutput


def _output(mlm: float, qa: float, hits: int, count: int) -> ObjectiveOutput:
    losses = {"mlm": torch.tensor(mlm), "qa": torch.tensor(qa)}
    return ObjectiveOutput(
        losses=losses,
        total=losses["mlm"] + losses["qa"],
        correct={"mlm": torch.tensor(hits)},
        counts={"mlm": torch.tensor(count)},
        mlm_over_capacity=torch.tensor(1),
    )


def test_one_rank_sums_skip_nonfinite_and_track_the_longest_run():
    meter = TaskMeter()
    meter.add(_output(2.0, 4.0, 3, 4))
    meter.add(_output(math.nan, 1.0, 4, 4))  # a non-finite total adds nothing to the sums
    meter.add(_output(4.0, 2.0, 1, 4))
    meter.add(_output(math.nan, 1.0, 4, 4))
    meter.add(_output(math.inf, 1.0, 4, 4))
    losses, accuracies = meter.reduce()
    assert losses == {"mlm": 3.0, "qa": 3.0}
    assert accuracies == {"mlm": 0.5}
    assert meter.health() == (3, 2, 5)  # 3 non-finite, the longest run 2, 5 labels over capacity
    meter.reset()
    meter.add(_output(math.nan, 1.0, 0, 4))  # the run goes on across log windows
    assert meter.health() == (1, 3, 1)
    assert meter.reduce() == ({}, {})
    meter.add(_output(1.0, 1.0, 0, 4))
    assert meter.health() == (1, 3, 2)  # the window's longest run stays; the current one ended


def _two_ranks(rank: int, store_path: str, results) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    meter = TaskMeter()
    meter.add(_output(1.0 + rank, 1.0, rank, 2))
    meter.add(_output(math.nan, 1.0, 0, 2))  # one non-finite micro-batch on each rank
    losses, accuracies = meter.reduce()
    results[rank] = (losses, accuracies, meter.health())
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_sum_counts_and_take_the_longest_run(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        losses, accuracies, health = results[rank]
        assert losses == {"mlm": 1.5, "qa": 1.0}
        assert accuracies == {"mlm": 0.25}
        # Two bad micro-batches in all; the run is 1 (the longest on any rank), not a sum over ranks.
        assert health == (2, 1, 4)
