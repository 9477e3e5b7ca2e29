"""Which sentences each virtual stream reads in an epoch, and which rank and worker reads each stream.

The shard order of an epoch is a permutation seeded by (seed, epoch), the same on every rank.
Laid end to end, the shards' sentences form one sequence of S sentences; it is cut into
``num_stretches`` contiguous *stretches* of S // n or S // n + 1 sentences. A stretch reads
only its own part of the shard sequence (at most two shards partially), so stretches are
disjoint. Cuts fall between sentences, so an image at a boundary has its sentences split
between two stretches.

Training (:class:`StreamLayout`) gives each of V *virtual streams* one stretch. V depends on the
global batch only (micro-batches per optimiser step M, times ``interleave``), never on the world
size or the worker count, so the epoch's global batches are the same on any number of ranks and
workers: micro-batch j (0..M-1) of global step s comes from stream ``(s % interleave) * M + j``,
its ``s // interleave``-th batch. Rank r of W takes j = r*a .. r*a + a - 1 (a = M / W, the
gradient accumulation steps), in that order. Validation keeps one stretch per (rank, worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lxtrain.data.index import ShardIndex


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard order (identical on every rank)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def stretch_bounds(total_sentences: int, num_stretches: int, stretch: int) -> tuple[int, int]:
    """[lo, hi) of the stretch's part of the epoch's sentence sequence."""
    return stretch * total_sentences // num_stretches, (stretch + 1) * total_sentences // num_stretches


def stretch_batches(total: int, num_stretches: int, stretch: int, batch_size: int, whole: bool) -> int:
    """Batches stretch ``stretch`` of ``num_stretches`` yields from ``total`` items: ``whole``
    (training) whole batches, the same count in every stretch; otherwise (evaluation) all of the
    stretch, the last batch partial."""
    if whole:
        return (total // num_stretches) // batch_size
    lo, hi = stretch_bounds(total, num_stretches, stretch)
    return -(-(hi - lo) // batch_size)


@dataclass
class StreamPlan:
    """The images of one stretch in stream order, with the sentences the stretch owns of each.

    All arrays have one entry per image; ``sent_lo:sent_hi`` index the image's own sentence
    list (the shard's json member).
    """

    shard: np.ndarray  # index into ShardIndex.shards
    position: np.ndarray  # sample position within the shard
    image_id: np.ndarray  # global image id
    sentence_base: np.ndarray  # global id of the image's sentence 0
    sent_lo: np.ndarray
    sent_hi: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def sentences(self) -> int:
        return int((self.sent_hi - self.sent_lo).sum())


def stream_plan(index: ShardIndex, order: np.ndarray, num_stretches: int, stretch: int) -> StreamPlan:
    """The plan of ``stretch`` (of ``num_stretches``) for shards read in ``order``."""
    shards = [index.shards[i] for i in order]
    counts = np.concatenate([s.sentences_per_image for s in shards])
    ends = np.cumsum(counts)
    starts = ends - counts
    lo, hi = stretch_bounds(int(ends[-1]), num_stretches, stretch)
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(starts, hi, side="left"))
    chosen = slice(first, last)
    shard_ids = np.concatenate(
        [np.full(s.images, i, dtype=np.int64) for i, s in zip(order, shards, strict=True)]
    )
    positions = np.concatenate([np.arange(s.images, dtype=np.int64) for s in shards])
    image_ids = np.concatenate([s.image_base + np.arange(s.images, dtype=np.int64) for s in shards])
    bases = np.concatenate([s.sentence_base for s in shards])
    return StreamPlan(
        shard=shard_ids[chosen],
        position=positions[chosen],
        image_id=image_ids[chosen],
        sentence_base=bases[chosen],
        sent_lo=np.maximum(starts[chosen], lo) - starts[chosen],
        sent_hi=np.minimum(ends[chosen], hi) - starts[chosen],
    )


@dataclass(frozen=True)
class StreamLayout:
    """The training layout of one rank: its virtual streams and the order it reads them in.

    A rank's *local* micro-batch number g (0, 1, ... in the order it yields them; g = s*a + i for
    global step s and accumulation step i) is served by local stream ``u = g % (a * interleave)``,
    that stream's batch number ``g // (a * interleave)``. Local stream u = t*a + i is the global
    stream ``t * M + r*a + i``. A worker role w of n owns the local streams u with u % n == w;
    since n divides a * interleave, role w yields exactly the g with g % n == w, which is the
    order in which PyTorch's data loader polls its workers (round-robin).

    Attributes:
        micro_batches: M, micro-batches per optimiser step over all ranks (global batch / micro).
        interleave: streams that serve each micro-batch position in turn, one step each.
        rank, world_size: this rank of W; W must divide M.
    """

    micro_batches: int
    interleave: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.interleave < 1:
            raise ValueError("micro-batches per step and interleave must be >= 1")
        if self.micro_batches % self.world_size:
            raise ValueError(
                f"world size {self.world_size} does not divide the {self.micro_batches} micro-batches "
                "per optimiser step (train_batch_size / train_micro_batch_size_per_gpu): run on a "
                "world size that divides it, or change train_batch_size in the DeepSpeed config"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def accumulation(self) -> int:
        """a: micro-batches of one optimiser step on this rank."""
        return self.micro_batches // self.world_size

    @property
    def streams(self) -> int:
        """V: virtual streams of the epoch, all ranks together."""
        return self.micro_batches * self.interleave

    @property
    def local_streams(self) -> int:
        """Streams this rank reads: a * interleave."""
        return self.accumulation * self.interleave

    def stream_id(self, local: int) -> int:
        """The global stream of local stream ``local`` (0..local_streams-1)."""
        turn, step_offset = divmod(local, self.accumulation)
        return turn * self.micro_batches + self.rank * self.accumulation + step_offset

    def locate(self, local_batch: int) -> tuple[int, int]:
        """(local stream, that stream's batch number) of the rank's micro-batch ``local_batch``."""
        turn, local = divmod(local_batch, self.local_streams)
        return local, turn

    def consumed(self, local: int, local_batches: int) -> int:
        """Batches of local stream ``local`` among the rank's first ``local_batches``."""
        return max(0, -(-(local_batches - local) // self.local_streams))

    def usable_workers(self, requested: int) -> int:
        """The largest worker count <= ``requested`` that divides the rank's streams (>= 1)."""
        return max(n for n in range(1, max(requested, 1) + 1) if self.local_streams % n == 0)


def epoch_stretches(
    layout: StreamLayout | None, rank: int, world_size: int, workers: int
) -> tuple[int, list[int]]:
    """(stretches an epoch is cut into, this rank's in the order of its local streams): the
    layout's virtual streams when training; one stretch per (rank, worker) for evaluation."""
    if layout is None:
        return world_size * workers, [rank * workers + role for role in range(workers)]
    return layout.streams, [layout.stream_id(local) for local in range(layout.local_streams)]


def refuse_layout_change(saved: dict, current: dict) -> None:
    """Raise ValueError if a saved data state's layout (what fixes the epoch's order besides the
    position: seed, batch sizes, streams, the data's size) differs from this run's ``current``
    one, naming the key, both values and the fix. Keys missing from ``saved`` are not checked."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"cannot resume the data position exactly: {key} was {saved[key]}, is {value} "
                f"(the epoch's order depends on it); {_layout_fix(key, saved)}"
            )


def _layout_fix(key: str, state: dict) -> str:
    """How to run with the layout a state was written with."""
    was = state[key]
    fixes = {
        "seed": f"run with --seed {was}",
        "batch_size": f"set train_micro_batch_size_per_gpu to {was} in the DeepSpeed config",
        "micro_batches_per_step": (
            "keep the global batch: set train_batch_size to "
            + (f"{was * state['batch_size']}" if "batch_size" in state else f"{was} x the micro-batch")
            + ' in the DeepSpeed config, with gradient_accumulation_steps "auto" (micro-batches per '
            "step = world_size x accumulation)"
        ),
        "interleave": f"run with --data-interleave {was}",
        "streams": f"run with --data-interleave {was} // micro-batches per step",
        "buffer_images": f"build the loader with buffer_images={was}",
        "sentences": "train on the same shards (--train-shards) as the run that wrote the state",
        "examples": "train on the same shards (--train-shards) as the run that wrote the state",
        "world_size": f"run on {was} ranks",
        "workers": f"run with --num-workers {was}",
    }
    return fixes[key]
