"""Fine-tuning batches from fine-tuning shards: per-rank, per-worker split, shuffle, tokenise, collate.

The split reuses the pre-training planner (``lxtrain.data.plan``): an epoch's shard order is a
permutation seeded by (seed, epoch), its examples laid end to end are cut into world x workers
equal slots, and each (rank, worker) reads only its slot. Training draws examples from a
seeded buffer (so a batch rarely holds two questions of one image) and yields the same number
of full batches in every slot, hence on every rank; evaluation reads each slot in order and
keeps the last partial batch, so every example is predicted exactly once.

Resuming mid-epoch replays the slot's draws up to the position without collating them (the
images are read again; the batches after the position are exactly the ones an uninterrupted
run would have produced).
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lxtrain import batch as B
from lxtrain.data.finetune_shards import FinetuneIndex, FinetuneSample
from lxtrain.data.plan import shard_order, stream_plan
from lxtrain.data.shard_format import CorruptSampleError
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.downstream.models import IGNORE_INDEX, PAIR_LABELS, TARGETS

META = "meta"
"""Batch key: a list (one per row) of {"id", "labelled", "label" | "answers", "answer_type"}."""


def collate(
    items: list[tuple[FinetuneSample, dict]], task: str, encoder: WordPieceEncoder, num_answers: int
) -> dict:
    """One batch (``lxtrain.batch`` model-input keys + task targets + META) from (sample, example) pairs."""
    ids, attention = encoder.encode([example["text"] for _, example in items])
    # (B, K, O, D): K images per example; VQA/GQA drop the K axis.
    features = torch.stack([torch.from_numpy(np.stack(s.features)) for s, _ in items]).float()
    boxes = torch.stack([torch.from_numpy(np.stack(s.boxes)) for s, _ in items])
    batch: dict = {
        B.INPUT_IDS: torch.from_numpy(ids),
        B.ATTENTION_MASK: torch.from_numpy(attention),
        B.TOKEN_TYPE_IDS: torch.zeros(ids.shape, dtype=torch.int64),
    }
    meta = []
    if task == "nlvr2":
        batch[B.OBJECT_FEATURES], batch[B.OBJECT_BOXES] = features, boxes
        labels = [example["label"] if example["labelled"] else IGNORE_INDEX for _, example in items]
        batch[PAIR_LABELS] = torch.tensor(labels, dtype=torch.int64)
        meta = [{"id": e["id"], "labelled": e["labelled"], "label": e["label"]} for _, e in items]
    else:
        batch[B.OBJECT_FEATURES], batch[B.OBJECT_BOXES] = features[:, 0], boxes[:, 0]
        targets = torch.zeros(len(items), num_answers)
        for row, (_, example) in enumerate(items):
            targets[row, example["answer_ids"]] = torch.tensor(example["answer_scores"], dtype=torch.float32)
        batch[TARGETS] = targets
        meta = [
            {
                "id": e["id"],
                "labelled": e["labelled"],
                "answers": dict(zip(e["answer_ids"], e["answer_scores"], strict=True)),
                "answer_type": e.get("answer_type"),
            }
            for _, e in items
        ]
    batch[META] = meta
    return batch


class FinetuneStream(IterableDataset):
    """The batches of one rank (split between its data-loader workers), for one epoch."""

    def __init__(
        self,
        index: FinetuneIndex,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        train: bool,
        tokenizer: str | None = None,
        buffer_examples: int = 512,
    ) -> None:
        self.index = index
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(workers, 1)
        self.seed, self.train, self.tokenizer = seed, train, tokenizer
        self.buffer_examples = buffer_examples
        self.num_answers = len(index.answers or [])
        self.epoch = 0
        self.corrupt_samples = 0
        self.skip = 0  # batches of this rank already consumed in this epoch (resume)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers

    def slot_batches(self, slot: int) -> int:
        """Batches slot ``slot`` yields in an epoch (training: the same in every slot)."""
        total = self.index.examples
        if self.train:
            return (total // self.num_slots) // self.batch_size
        size = (slot + 1) * total // self.num_slots - slot * total // self.num_slots
        return -(-size // self.batch_size)

    def rank_batches(self) -> int:
        first = self.rank * self.workers
        return sum(self.slot_batches(slot) for slot in range(first, first + self.workers))

    def _examples(self, slot: int) -> Iterator[tuple[FinetuneSample, dict]]:
        order = shard_order(len(self.index.shards.shards), self.seed, self.epoch, shuffle=self.train)
        plan = stream_plan(self.index.shards, order, self.num_slots, slot)
        start = 0
        while start < len(plan):
            # A slot reads runs of consecutive samples of one shard; read each run in one pass.
            stop = start
            while (
                stop + 1 < len(plan)
                and plan.shard[stop + 1] == plan.shard[start]
                and plan.position[stop + 1] == plan.position[stop] + 1
            ):
                stop += 1
            samples = self.index.iter_samples(
                int(plan.shard[start]), int(plan.position[start]), int(plan.position[stop]) + 1
            )
            for offset, sample in enumerate(samples):
                if isinstance(sample, CorruptSampleError):
                    self.corrupt_samples += 1
                    print(f"warning: skipped a corrupt fine-tuning sample: {sample}", file=sys.stderr)
                    continue
                i = start + offset
                for example in sample.examples[int(plan.sent_lo[i]) : int(plan.sent_hi[i])]:
                    yield sample, example
            start = stop + 1

    def _shuffled(self, slot: int, stream: Iterator) -> Iterator[tuple[FinetuneSample, dict]]:
        rng = np.random.default_rng([self.seed, self.epoch, slot, 0xF17E])
        buffer: list = []
        for item in stream:
            buffer.append(item)
            if len(buffer) >= self.buffer_examples:
                pick = int(rng.integers(len(buffer)))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()
        while buffer:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()

    def iter_slot(self, slot: int, worker: int) -> Iterator[dict]:
        encoder = WordPieceEncoder(self.tokenizer)
        stream = self._examples(slot)
        if self.train:
            # Skipped corrupt samples could leave a slot short of its batch count, and every rank
            # must take the same number of steps: a short slot goes round its stream again.
            stream = itertools.chain(self._shuffled(slot, stream), self._shuffled(slot, self._examples(slot)))
        limit = self.slot_batches(slot)
        # This worker's share of the rank's consumed batches (the DataLoader takes workers in turn).
        skip = max(0, -(-(self.skip - worker) // self.workers))
        items: list = []
        produced = 0
        for item in stream:
            items.append(item)
            if len(items) == self.batch_size:
                if produced >= skip:
                    yield collate(items, self.index.task, encoder, self.num_answers)
                produced, items = produced + 1, []
                if produced >= limit:
                    return
        if items and not self.train and produced >= skip:
            yield collate(items, self.index.task, encoder, self.num_answers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.iter_slot(self.rank * self.workers + worker, worker)


class FinetuneLoader:
    """The rank's batches of one epoch from ``position`` on; ``len`` is the full epoch's batch count."""

    def __init__(self, stream: FinetuneStream, num_workers: int) -> None:
        self.stream, self.num_workers = stream, num_workers

    def __len__(self) -> int:
        return self.stream.rank_batches()

    def epoch(self, epoch: int, position: int = 0) -> Iterator[dict]:
        # A copy per call: an iterator still running (training) keeps its own epoch and position.
        stream = copy.copy(self.stream)
        stream.epoch, stream.skip = epoch, position
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))


def build_loader(
    index: FinetuneIndex,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    train: bool,
    tokenizer: str | None = None,
) -> FinetuneLoader:
    stream = FinetuneStream(
        index,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=num_workers,
        seed=seed,
        train=train,
        tokenizer=tokenizer,
    )
    return FinetuneLoader(stream, num_workers)
