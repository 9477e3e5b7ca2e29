"""The pre-training stream's global order does not depend on the world size or the worker count.

With the same global batch (M micro-batches of b per optimiser step), runs on 1, 2 or 4 ranks
(gradient accumulation 4, 2, 1) with any worker count form the same global batches, and a resume
on another world size continues the epoch with no sentence repeated or skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain.data import finetune_shards
from lxtrain.data.collate import SENTENCE_IDS
from lxtrain.data.loader import build_pretrain_loader
from lxtrain.data.plan import StreamLayout
from lxtrain.downstream.data import META, build_loader
from lxtrain.synthetic import finetuning as synthetic_tasks
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate

MICRO = 4  # b: examples per micro-batch
STEP_MICRO_BATCHES = 4  # M: micro-batches per optimiser step over all ranks
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (world size, accumulation), W x a = M


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """120 tiny images (~800 sentences) in 4 shards."""
    out = tmp_path_factory.mktemp("streams")
    world = World(feature_dim=8, boxes=4, max_objects=3)
    generate(SyntheticConfig(out=out, images=120, valid_images=1, world=world, direct=True, shard_size=30))
    return out / "shards" / "train"


def _loader(
    shards: Path, rank: int, world_size: int, workers: int, step: int = STEP_MICRO_BATCHES, **options
):
    """Rank ``rank`` of ``world_size`` reading ``step`` micro-batches per optimiser step over all ranks."""
    settings = dict(
        batch_size=MICRO,
        rank=rank,
        world_size=world_size,
        accumulation=step // world_size,
        seed=11,
        num_workers=workers,
        buffer_images=16,
        with_ids=True,
        in_process=True,
    )
    return build_pretrain_loader(shards, **(settings | options))


def _global_batches(
    shards: Path, world_size: int, workers: int, step: int = STEP_MICRO_BATCHES, **options
) -> list[list[dict]]:
    """One epoch as a list of optimiser steps, each the M micro-batches in order j = r*a + i."""
    accumulation = step // world_size
    per_rank = [
        list(_loader(shards, rank, world_size, workers, step, **options)) for rank in range(world_size)
    ]
    steps = len(per_rank[0]) // accumulation
    assert all(len(batches) == steps * accumulation for batches in per_rank)
    return [
        [batch for batches in per_rank for batch in batches[step * accumulation : (step + 1) * accumulation]]
        for step in range(steps)
    ]


def _assert_same_steps(left: list[list[dict]], right: list[list[dict]]) -> None:
    assert len(left) == len(right)
    for step, (a, b) in enumerate(zip(left, right, strict=True)):
        assert len(a) == len(b)
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), (step, j, key)


def test_layout_deals_every_stream_to_one_rank_in_step_order() -> None:
    for interleave in (1, 2, 3):
        streams = STEP_MICRO_BATCHES * interleave
        for world_size, _ in LAYOUTS:
            owned = []
            for rank in range(world_size):
                layout = StreamLayout(STEP_MICRO_BATCHES, interleave, rank, world_size)
                a = layout.accumulation
                for g in range(3 * layout.local_streams):
                    local, number = layout.locate(g)
                    step, i = divmod(g, a)
                    # Micro-batch j = r*a + i of step s: stream (s % interleave) * M + j, batch s // interleave.
                    expected = (step % interleave) * STEP_MICRO_BATCHES + rank * a + i
                    assert layout.stream_id(local) == expected and number == step // interleave
                owned += [layout.stream_id(u) for u in range(layout.local_streams)]
            assert sorted(owned) == list(range(streams))
    layout = StreamLayout(STEP_MICRO_BATCHES, 2, 0, 1)  # 8 local streams
    assert [layout.usable_workers(n) for n in range(0, 10)] == [1, 1, 2, 2, 4, 4, 4, 4, 8, 8]


def test_same_global_batches_on_any_world_size_and_worker_count(shards: Path, caplog) -> None:
    reference = _global_batches(shards, 1, 0)
    assert len(reference) > 10
    with caplog.at_level(logging.WARNING, logger="lxtrain.data"):
        for world_size, _ in LAYOUTS:
            for workers in (0, 1, 2, 3):
                if (world_size, workers) != (1, 0):
                    _assert_same_steps(_global_batches(shards, world_size, workers), reference)
    # 3 workers divide no rank's streams here (8, 4 or 2): 2 are used, with a warning.
    assert "num_workers 3 does not divide" in caplog.text
    ids = np.concatenate([b[SENTENCE_IDS].numpy() for step in reference for b in step])
    assert len(np.unique(ids)) == len(ids)


def test_interleave_lets_three_workers_share_one_rank(shards: Path) -> None:
    # interleave 3: one rank reads 4 x 3 = 12 streams, which 3 workers share exactly.
    reference = _global_batches(shards, 1, 0, interleave=3)
    loader = _loader(shards, 0, 1, 3, interleave=3)
    assert loader.dataset.workers == 3
    _assert_same_steps(_global_batches(shards, 1, 3, interleave=3), reference)
    _assert_same_steps(_global_batches(shards, 4, 3, interleave=3), reference)


def test_steps_per_epoch_do_not_depend_on_the_world_size(shards: Path) -> None:
    steps = {
        len(_loader(shards, rank, world_size, 2)) // (STEP_MICRO_BATCHES // world_size)
        for world_size, _ in LAYOUTS
        for rank in range(world_size)
    }
    assert len(steps) == 1


@pytest.mark.parametrize(
    "per_step, phases",
    [
        # 2 ranks x 1 worker for 3 steps -> 1 rank x 2 workers up to step 7 -> 4 ranks x 3 workers to the end.
        (STEP_MICRO_BATCHES, [(2, 1, 0, 3), (1, 2, 3, 7), (4, 3, 7, None)]),
        # The launched elastic run of tests/test_elastic.py (M = 6): 2 ranks to its step-2 checkpoint
        # -> 1 rank to step 4 -> 3 ranks (here to the end of the epoch); the same with 2 workers.
        (6, [(2, 0, 0, 2), (1, 0, 2, 4), (3, 0, 4, None)]),
        (6, [(2, 0, 0, 2), (1, 2, 2, 4), (3, 2, 4, None)]),
    ],
    ids=["2-1-4", "elastic-run", "elastic-run-workers"],
)
def test_resume_on_other_world_sizes_and_workers_sees_every_sentence_once(
    shards: Path, per_step: int, phases: list[tuple[int, int, int, int | None]]
) -> None:
    reference = _global_batches(shards, 1, 0, per_step, epoch=1)
    steps = len(reference)
    seen: list[list[dict]] = []
    state = None
    for world_size, workers, start, stop in phases:
        stop = steps if stop is None else stop  # None: to the end of the epoch
        accumulation = per_step // world_size
        per_rank = []
        for rank in range(world_size):
            loader = _loader(shards, rank, world_size, workers, per_step)
            if state is None:
                loader.set_epoch(1)
            else:
                # The old layout's full state: batches_consumed at its accumulation, converted by step.
                loader.load_state_dict(state)
                assert loader.batches_consumed == start * accumulation
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(batches) == (stop - start) * accumulation:
                    break
            per_rank.append(batches)
            rank_state = loader.state_dict()
        state = rank_state  # a full state of the old layout, as a checkpoint would hold
        for step in range(stop - start):
            seen.append(
                [b for batches in per_rank for b in batches[step * accumulation : (step + 1) * accumulation]]
            )
    _assert_same_steps(seen, reference)
    ids = np.concatenate([b[SENTENCE_IDS].numpy() for step in seen for b in step])
    assert len(np.unique(ids)) == len(ids)
    assert state["epoch"] == 1 and state["batches_consumed"] == steps * (per_step // phases[-1][0])


def test_resume_refuses_what_cannot_be_exact(shards: Path) -> None:
    state = _loader(shards, 0, 2, 2).state_dict()
    assert state["micro_batches_per_step"] == STEP_MICRO_BATCHES and state["streams"] == 8
    _loader(shards, 0, 4, 1).load_state_dict(state)  # another world size and worker count: fine
    with pytest.raises(ValueError, match=r"batch_size was 4, is 8.*train_micro_batch_size_per_gpu to 4"):
        _loader(shards, 0, 2, 2, batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"micro_batches_per_step was 4, is 2.*train_batch_size to 16"):
        _loader(shards, 0, 2, 2, accumulation=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed was 11, is 12.*--seed 11"):
        _loader(shards, 0, 2, 2, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match=r"interleave was 2, is 3.*--data-interleave 2"):
        _loader(shards, 0, 2, 2, interleave=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"buffer_images was 16, is 32"):
        _loader(shards, 0, 2, 2, buffer_images=32).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"inside an optimiser step \(batches_consumed 3 at accumulation 2\)"
    ):
        _loader(shards, 0, 1, 2).load_state_dict(state | {"batches_consumed": 3})
    old = {"epoch": 1, "batches_consumed": 5, "seed": 11, "world_size": 2, "workers": 2, "batch_size": 4}
    with pytest.raises(ValueError, match="slot layout of an earlier lxtrain"):
        _loader(shards, 0, 2, 2).load_state_dict(old)
    with pytest.raises(ValueError, match="cannot fill one batch per stream"):
        _loader(shards, 0, 1, 0, batch_size=200)


@pytest.mark.multiproc
def test_worker_processes_follow_the_stream_order(shards: Path) -> None:
    reference = list(_loader(shards, 1, 2, 0))
    processes = _loader(shards, 1, 2, 2, in_process=False)
    head = []
    for batch in processes:
        head.append({k: v.clone() for k, v in batch.items()})
        if len(head) == 5:
            break
    resumed = _loader(shards, 1, 2, 4, in_process=False)  # 4 workers: the rank's 4 streams, one each
    resumed.load_state_dict(processes.state_dict())
    tail = [{k: v.clone() for k, v in batch.items()} for batch in resumed]
    assert len(head + tail) == len(reference)
    for x, y in zip(head + tail, reference, strict=True):
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def vqa_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    world = World(feature_dim=8, boxes=4, max_objects=3)
    synthetic_tasks.generate(
        synthetic_tasks.TaskSetConfig(out=out, images=40, sets=8, world=world, shards=True)
    )
    return finetune_shards.open_finetune_index(out / "shards" / "vqa_train")


def _finetune_steps(index, world_size: int, workers: int, epoch: int = 0, step: int = 0) -> list[list[list]]:
    """Fine-tuning steps from ``step`` on, each the M micro-batches' example ids in order."""
    accumulation = STEP_MICRO_BATCHES // world_size
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(
            index,
            batch_size=3,
            rank=rank,
            world_size=world_size,
            num_workers=workers,
            seed=5,
            train=True,
            accumulation=accumulation,
        )
        if workers:  # the data loader's worker processes would need `multiproc`: same roles in-process
            loader.num_workers = 0
        per_rank.append([[row["id"] for row in b[META]] for b in loader.epoch(epoch, step * accumulation)])
    steps = len(per_rank[0]) // accumulation
    return [
        [ids for batches in per_rank for ids in batches[s * accumulation : (s + 1) * accumulation]]
        for s in range(steps)
    ]


def test_finetuning_global_batches_do_not_depend_on_the_world_size_or_workers(vqa_index) -> None:
    reference = _finetune_steps(vqa_index, 1, 0, epoch=1)
    assert len(reference) >= 4
    ids = [i for step in reference for batch in step for i in batch]
    assert len(set(ids)) == len(ids)
    for world_size, _ in LAYOUTS:
        for workers in (0, 2, 3):
            assert _finetune_steps(vqa_index, world_size, workers, epoch=1) == reference
    # A resume at step 2 on 4 ranks continues a 2-rank epoch exactly.
    assert _finetune_steps(vqa_index, 4, 2, epoch=1, step=2) == reference[2:]


@pytest.mark.multiproc
def test_finetuning_worker_processes_follow_the_stream_order(vqa_index) -> None:
    def ids(workers: int, position: int) -> list[list]:
        loader = build_loader(
            vqa_index,
            batch_size=3,
            rank=1,
            world_size=2,
            num_workers=workers,
            seed=5,
            train=True,
            accumulation=2,
        )
        return [[row["id"] for row in batch[META]] for batch in loader.epoch(1, position)]

    reference = ids(0, 0)
    for position in (0, 3):  # 3: the rotated roles, the second worker's batch first
        assert ids(2, position) == reference[position:]
