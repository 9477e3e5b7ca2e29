"""Fine-tuning batches from fine-tuning shards: virtual streams, shuffle, tokenise, collate.

The split reuses the pre-training planner (``lxtrain.data.plan``): an epoch's shard order is a
permutation seeded by (seed, epoch) and its examples laid end to end are cut into equal
stretches. Training uses V = world_size x accumulation x interleave stretches, the pre-training
loader's virtual streams: micro-batch j of global step s is batch s // interleave of stream
(s % interleave) x M + j (M = world_size x accumulation), each stream drawing from its own seeded
buffer (so a batch rarely holds two questions of one image), so the global batches do not depend
on the world size or the worker count, and every stream, hence every rank, yields the same
number of full batches. Evaluation cuts one stretch per (rank, worker), reads it in order and
keeps the last partial batch, so every example is predicted exactly once.

Resuming mid-epoch replays each stream's draws up to the position without collating them (the
images are read again; the batches after the position are exactly the ones an uninterrupted
run would have produced, on any world size with the same global batch).
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
from lxtrain.data.plan import StreamLayout, epoch_stretches, shard_order, stream_plan, stretch_batches
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
    """The batches of one rank (split between its data-loader workers), for one epoch.

    Training uses the pre-training loader's virtual streams (:class:`lxtrain.data.plan.StreamLayout`):
    V = world_size x accumulation x ``interleave`` stretches, each with its own shuffle buffer seeded
    by (seed, epoch, stream), so the global batches of a step do not depend on the world size or
    the worker count. Evaluation keeps one stretch per (rank, worker), read in order.
    """

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
        accumulation: int = 1,
        interleave: int = 2,
    ) -> None:
        self.index = index
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.layout = StreamLayout(world_size * accumulation, interleave, rank, world_size) if train else None
        requested = max(workers, 1)
        self.workers = requested if self.layout is None else self.layout.usable_workers(requested)
        if self.workers < workers:
            print(
                f"warning: num_workers {workers} does not divide this rank's {self.layout.local_streams} "
                f"streams (accumulation {accumulation} x interleave {interleave}): using {self.workers} "
                "workers, which give the same batches",
                file=sys.stderr,
            )
        self.seed, self.train, self.tokenizer = seed, train, tokenizer
        self.buffer_examples = buffer_examples
        self.num_answers = len(index.answers or [])
        self.epoch = 0
        self.corrupt_samples = 0
        self.skip = 0  # batches of this rank already consumed in this epoch (resume)

    @property
    def num_stretches(self) -> int:
        return epoch_stretches(self.layout, self.rank, self.world_size, self.workers)[0]

    @property
    def local_stretches(self) -> list[int]:
        return epoch_stretches(self.layout, self.rank, self.world_size, self.workers)[1]

    def stretch_batches(self, stretch: int) -> int:
        """Batches stretch ``stretch`` yields in an epoch (training: the same in every stretch)."""
        return stretch_batches(self.index.examples, self.num_stretches, stretch, self.batch_size, self.train)

    def rank_batches(self) -> int:
        return sum(self.stretch_batches(stretch) for stretch in self.local_stretches)

    def _examples(self, stretch: int) -> Iterator[tuple[FinetuneSample, dict]]:
        order = shard_order(len(self.index.shards.shards), self.seed, self.epoch, shuffle=self.train)
        plan = stream_plan(self.index.shards, order, self.num_stretches, stretch)
        start = 0
        while start < len(plan):
            # A stretch reads runs of consecutive samples of one shard; read each run in one pass.
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

    def _shuffled(self, stretch: int, stream: Iterator) -> Iterator[tuple[FinetuneSample, dict]]:
        rng = np.random.default_rng([self.seed, self.epoch, stretch, 0xF17E])
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

    def _item_batches(self, stretch: int) -> Iterator[list[tuple[FinetuneSample, dict]]]:
        """The stretch's batches as lists of (sample, example), before collation."""
        stream = self._examples(stretch)
        if self.train:
            # Skipped corrupt samples could leave a stretch short of its batch count, and every rank
            # must take the same number of steps: a short stretch goes round its stream again.
            stream = itertools.chain(
                self._shuffled(stretch, stream), self._shuffled(stretch, self._examples(stretch))
            )
        limit = self.stretch_batches(stretch)
        items: list = []
        produced = 0
        for item in stream:
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                produced, items = produced + 1, []
                if produced >= limit:
                    return
        if items and not self.train:
            yield items

    def iter_role(self, role: int) -> Iterator[dict]:
        """The batches of worker role ``role`` from the resume point on (see FinetuneLoader)."""
        encoder = WordPieceEncoder(self.tokenizer)
        workers, skip = self.workers, self.skip
        if self.layout is None:
            owned = {role: max(0, -(-(skip - role) // workers))}
            schedule = ((role, None) for _ in itertools.count())
        else:
            layout = self.layout
            owned = {
                local: layout.consumed(local, skip) for local in range(role, layout.local_streams, workers)
            }
            first = skip + (role - skip) % workers
            schedule = (layout.locate(g) for g in range(first, self.rank_batches(), workers))
        streams = {}
        for local, done in owned.items():
            # Resume: the consumed batches are drawn again (images read) but not collated.
            streams[local] = self._item_batches(self.local_stretches[local])
            for _ in itertools.islice(streams[local], done):
                pass
        for local, _ in schedule:
            items = next(streams[local], None)
            if items is None:
                return
            yield collate(items, self.index.task, encoder, self.num_answers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            return self.iter_role(0)
        # Rotation: the loader polls worker 0 first, so it plays the role of the next batch.
        return self.iter_role((info.id + self.skip) % self.workers)


class FinetuneLoader:
    """The rank's batches of one epoch from ``position`` on; ``len`` is the full epoch's batch count
    (training: steps per epoch x accumulation, the steps the same on every world size)."""

    def __init__(self, stream: FinetuneStream, num_workers: int) -> None:
        self.stream = stream
        self.num_workers = stream.workers if num_workers else 0

    def __len__(self) -> int:
        return self.stream.rank_batches()

    def epoch(self, epoch: int, position: int = 0) -> Iterator[dict]:
        """Batches of ``epoch`` after this rank's first ``position`` (``step x accumulation``)."""
        # A copy per call: an iterator still running (training) keeps its own epoch and position.
        stream = copy.copy(self.stream)
        stream.epoch, stream.skip = epoch, position
        if self.num_workers == 0:
            return _round_robin(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))


def _round_robin(stream: FinetuneStream) -> Iterator[dict]:
    """The worker roles' batches in the data loader's polling order, in this process."""
    roles = [stream.iter_role((i + stream.skip) % stream.workers) for i in range(stream.workers)]
    while roles:
        for role in list(roles):
            batch = next(role, None)
            if batch is None:
                roles.remove(role)
            else:
                yield batch


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
    accumulation: int = 1,
) -> FinetuneLoader:
    """A rank's fine-tuning loader; ``accumulation`` (training) fixes the global batch with the
    world size, and with it the order (evaluation ignores it)."""
    stream = FinetuneStream(
        index,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=num_workers,
        seed=seed,
        train=train,
        tokenizer=tokenizer,
        accumulation=accumulation,
    )
    return FinetuneLoader(stream, num_workers)
