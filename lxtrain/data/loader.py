"""The streaming pre-training loader: shards -> virtual streams -> image buffers -> batches.

    loader = build_pretrain_loader("shards/train", batch_size=micro, rank=rank, world_size=world,
                                   accumulation=accumulation, seed=0, num_workers=4)
    loader.load_state_dict({"epoch": e, "batches_consumed": step_in_epoch * accumulation})
    for epoch in range(start_epoch, epochs):
        for batch in loader:                           # len(loader) micro-batches, equal on every rank
            ...                                        # `accumulation` of them per optimiser step

Per epoch (see :mod:`lxtrain.data.plan`): the shard order is shuffled by (seed, epoch); the
sentence sequence is cut into V = M x ``interleave`` equal stretches, one per *virtual stream*,
where M = world_size x accumulation is the number of micro-batches per optimiser step over all
ranks (the DeepSpeed config's train_batch_size / train_micro_batch_size_per_gpu). V depends on
the global batch only, so micro-batch j of global step s is the same batch on any world size and
any worker count: the s // interleave-th batch of stream (s % interleave) * M + j. Each stream
has its own :class:`SentenceBuffer` and random streams seeded by (seed, epoch, stream); rank r
reads the streams of j = r*a .. r*a + a - 1 (a = accumulation) and yields their batches in step
order, a per step. Every stream yields ``(S // V) // batch_size`` batches, so every rank yields
the same number, steps per epoch are the same on every world size, and each epoch drops fewer
than ``batch_size + 1`` sentences per stream (the *tail*: a different random set each epoch).

Workers: a rank's a x interleave streams are dealt to its data-loader workers, role w taking the
streams u with u % workers == w; PyTorch's data loader polls workers round-robin, and local
batch g belongs to stream g % (a x interleave), so the order is exact when the worker count
divides a x interleave. Otherwise the loader starts the largest worker count below the request
that divides it (a warning says so): the same batches, fewer processes.

Resume is exact: the state is (epoch, batches consumed on this rank), and needs no more than that
when the world size or worker count changes. Each worker replays the buffer bookkeeping of its
streams over their consumed batches without reading data (see :mod:`lxtrain.data.sampler`), loads
the images buffered at that point, and continues; the worker roles are rotated so that the
loader's first poll hits the worker that owns the next batch. Exactness assumes no corrupt sample
in the shards (a dropped image changes the buffer from then on, and replay cannot know about it).

Validation (``drop_last=False``) keeps the simpler split: one stretch per (rank, worker), every
sentence once, each worker ending with a partial batch.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lxtrain.data.collate import BatchBuilder
from lxtrain.data.index import ShardIndex, open_index
from lxtrain.data.plan import (
    StreamLayout,
    StreamPlan,
    epoch_stretches,
    refuse_layout_change,
    shard_order,
    stream_plan,
    stretch_batches,
)
from lxtrain.data.problems import DataError
from lxtrain.data.ring import PinnedSlots, RingBatch, RingReceiver, SharedRing, stage_batches
from lxtrain.data.sampler import SentenceBuffer
from lxtrain.data.shard_format import (
    CorruptSampleError,
    ImageSample,
    ShardReadError,
    decode_sample,
    iter_shard,
    sample_key,
    shard_label,
)
from lxtrain.data.tokenizer import MAX_LENGTH, WordPieceEncoder

log = logging.getLogger("lxtrain.data")

RING_EXTRA_SLOTS = 4
"""Ring segments per worker beyond ``prefetch_factor``: the one being built, the batch the loop
holds, the one it just dropped (released at the next fetch) and one spare."""

_STRUCTURE, _CONTENT = 0, 1  # random-stream tags: buffer bookkeeping vs per-batch content
DAMAGED_SHARD_FIX = (
    "The shard is damaged: re-run the conversion that wrote it (python -m lxtrain.data.make_shards, "
    "or lxtrain.synthetic.pretraining --shards) or restore it from a copy, then rerun with --resume auto"
)
UNREADABLE_SHARD_FIX = (
    "The shard could not be read: check that its URL or pipe: command works in a shell on this "
    "machine (network, credentials, path), then rerun with --resume auto"
)


@dataclass
class LoaderConfig:
    """Options of a pre-training or validation loader.

    Attributes:
        batch_size: examples per batch on this rank (the micro-batch).
        seed: data seed; the training order is a function of (seed, epoch, micro-batches per
            step, batch_size, interleave, buffer_images) only, not of the world size or workers.
        num_workers: data-loader worker processes per rank (0: build batches in this process);
            training uses the largest count <= this that divides accumulation x interleave.
        buffer_images: images held per stream (training) or per worker (validation); batches
            draw distinct images from it, so keep it well above ``batch_size``. Memory per rank:
            accumulation x interleave x buffer_images x boxes x dim x 2 bytes (training).
        interleave: virtual streams per micro-batch position of a step, serving alternate steps
            (training): more streams let more workers share a rank's work (the worker count must
            divide accumulation x interleave) at the cost of one buffer each.
        tokenizer: None for the packaged BERT uncased vocabulary, or a path / local model name.
        max_length: word-pieces per sentence including [CLS] and [SEP].
        shuffle: shuffle shards per epoch and sentences within images (off for validation).
        drop_last: the virtual-stream layout with equal, full batches on every rank, dropping the
            tail (training); off: one stretch per (rank, worker), the whole split, each worker
            ending with a partial batch (validation).
        mismatch_probability, word_mask_probability, object_mask_probability: task rates.
        object_word_ids, object_word_mask_probability: word-pieces masked at their own rate
            (None: the word rate, as in LXMERT; see :func:`lxtrain.tasks.masking.mask_words`).
        strict: a corrupt sample stops the run instead of being skipped with a warning.
        with_ids: add ``image_ids``/``sentence_ids`` to batches (tests and debugging).
        pin_memory: with CUDA, hand out batches in pinned memory, staged by a background
            thread into a few pinned slots allocated once and reused (see
            :mod:`lxtrain.data.ring`), not into fresh pinned memory per batch; without CUDA it
            does nothing.
        prefetch_factor: batches prefetched per worker.
        in_process: run the ``num_workers`` worker roles round-robin in this process instead of
            in worker processes: the same batches in the same order (tests, debugging).
        shared_buffers: workers build batches into a ring of at most ``prefetch_factor + 4``
            shared-memory segments per worker, allocated once per epoch, instead of new tensors
            that the data loader copies into fresh shared memory per batch (zero-filled page by
            page: the largest cost of a worker). A segment is reused only once no tensor of its
            batch is alive in this process, so batches may be kept; while too many are, workers
            build in fresh memory. None (default) and True: on with worker processes.
    """

    batch_size: int
    seed: int = 0
    num_workers: int = 2
    buffer_images: int = 1024
    interleave: int = 2
    tokenizer: str | None = None
    max_length: int = MAX_LENGTH
    shuffle: bool = True
    drop_last: bool = True
    mismatch_probability: float = 0.5
    word_mask_probability: float = 0.15
    object_mask_probability: float = 0.15
    object_word_ids: tuple[int, ...] = ()
    object_word_mask_probability: float | None = None
    strict: bool = False
    with_ids: bool = False
    pin_memory: bool = False
    prefetch_factor: int = 2
    in_process: bool = False
    shared_buffers: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.buffer_images < 1 or self.interleave < 1 or self.num_workers < 0:
            raise ValueError("batch_size, buffer_images and interleave must be >= 1, num_workers >= 0")
        for name in ("mismatch_probability", "word_mask_probability", "object_mask_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.object_word_mask_probability is not None:
            if not 0.0 <= self.object_word_mask_probability <= 1.0:
                raise ValueError("object_word_mask_probability must be in [0, 1]")
            if not self.object_word_ids:
                raise ValueError("object_word_mask_probability needs object_word_ids")

    @property
    def workers(self) -> int:
        """Worker roles asked for: with no worker processes the main process is the one worker."""
        return max(self.num_workers, 1)


class _ImageSource:
    """Reads the images of one stream plan by stream position, sequentially where possible."""

    def __init__(self, index: ShardIndex, plan: StreamPlan, strict: bool, counter) -> None:
        self.index, self.plan, self.strict, self.counter = index, plan, strict, counter
        self._items: Iterator | None = None
        self._pending: tuple | None = None
        self._next = -1
        self._run_end = -1

    def _open(self, position: int) -> None:
        shard = self.plan.shard[position]
        end = position
        while end < len(self.plan) and self.plan.shard[end] == shard:
            end += 1
        self._run_end = end
        self._items = iter_shard(
            self.index.shards[shard].url,
            int(self.plan.position[position]),
            int(self.plan.position[end - 1]) + 1,
        )
        self._pending = None

    def _bad(self, message: str, unreadable: bool = False) -> None:
        if self.strict:
            # A failed transfer is not a damaged shard: re-converting would not help.
            raise DataError(f"{message}. {UNREADABLE_SHARD_FIX if unreadable else DAMAGED_SHARD_FIX}")
        with self.counter.get_lock():
            self.counter.value += 1
        log.warning("skipping corrupt sample: %s (%d skipped so far)", message, self.counter.value)

    def get(self, position: int) -> ImageSample | None:
        """The image at a stream position, or None (counted and logged) if it cannot be read."""
        if self._items is None or position != self._next or position >= self._run_end:
            self._open(position)
        self._next = position + 1
        want = int(self.plan.position[position])
        shard = self.index.shards[self.plan.shard[position]]
        where = f"{shard_label(shard.url)}: sample {sample_key(want)}"
        while True:
            item = self._pending or next(self._items, None)
            self._pending = None
            if item is None or item[0] > want:
                self._pending = item
                self._bad(f"{where}: missing (truncated shard?)")
                return None
            if item[0] == want:
                break
        payload = item[1]
        try:
            if isinstance(payload, CorruptSampleError):
                raise payload
            image = decode_sample(payload, where)
            expected = (self.index.boxes_per_image, self.index.feature_dim)
            if image.features.shape != expected:
                raise CorruptSampleError(f"{where}: features {image.features.shape}, index says {expected}")
            if not image.sentences:
                raise CorruptSampleError(f"{where}: no sentences")
        except CorruptSampleError as error:
            self._bad(str(error), unreadable=isinstance(error, ShardReadError))
            return None
        return image


@dataclass
class _Stream:
    """One stream being read by a worker: its stretch, plan, buffer and image source."""

    stretch: int
    plan: StreamPlan
    buffer: SentenceBuffer
    source: _ImageSource


class PretrainStream(IterableDataset):
    """The per-rank iterable dataset; see the module docstring. Use :class:`PretrainLoader`."""

    def __init__(
        self,
        index: ShardIndex,
        config: LoaderConfig,
        rank: int,
        world_size: int,
        counter,
        accumulation: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.index, self.config = index, config
        self.rank, self.world_size = rank, world_size
        self.counter = counter
        self.epoch = 0
        self.skip = 0  # micro-batches of this rank's epoch already consumed
        # Training: the world-independent stream layout; validation: one stretch per (rank, worker).
        self.layout = (
            StreamLayout(world_size * accumulation, config.interleave, rank, world_size)
            if config.drop_last
            else None
        )
        self.workers = config.workers if self.layout is None else self.layout.usable_workers(config.workers)
        if self.workers < config.num_workers:
            log.warning(
                "num_workers %d does not divide this rank's %d streams (accumulation %d x interleave %d): "
                "using %d workers, which give the same batches",
                config.num_workers,
                self.layout.local_streams,
                self.layout.accumulation,
                config.interleave,
                self.workers,
            )
        # (workers, slots) int32 flags of the workers' shared rings (lxtrain.data.ring), made by
        # PretrainLoader before it forks the workers, which inherit them; None: no ring.
        self.ring_flags: torch.Tensor | None = None
        self.encoder = WordPieceEncoder(config.tokenizer, config.max_length)  # fails early if missing

    @property
    def num_stretches(self) -> int:
        """Stretches the epoch's sentences are cut into (the streams of all ranks)."""
        return epoch_stretches(self.layout, self.rank, self.world_size, self.workers)[0]

    @property
    def local_stretches(self) -> list[int]:
        """The stretch of each of this rank's local streams."""
        return epoch_stretches(self.layout, self.rank, self.world_size, self.workers)[1]

    def stream_batches(self, stretch: int) -> int:
        """Batches one stream yields per epoch (the same for every stream when training)."""
        total, whole = self.index.sentences, self.layout is not None
        return stretch_batches(total, self.num_stretches, stretch, self.config.batch_size, whole)

    def rank_batches(self) -> int:
        return sum(self.stream_batches(stretch) for stretch in self.local_stretches)

    def _logical_worker(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.workers:
            raise ValueError(f"DataLoader has {info.num_workers} workers, the layout uses {self.workers}")
        # Rotation: the loader polls worker 0 first, so worker 0 plays the role that owns the
        # next batch of the resumed epoch (batch `skip` belongs to role skip % workers).
        return (info.id + self.skip) % self.workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_role(self._logical_worker())

    def _schedule(self, role: int) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """Role ``role``'s local streams with their consumed batch counts, and the (local stream,
        batch number) of each batch it yields from the resume point on, in order."""
        workers, skip = self.workers, self.skip
        if self.layout is None:  # validation: the role's own stretch, batch after batch
            done = max(0, math.ceil((skip - role) / workers))
            total = self.stream_batches(self.local_stretches[role])
            return {role: done}, [(role, number) for number in range(done, total)]
        layout = self.layout
        owned = {local: layout.consumed(local, skip) for local in range(role, layout.local_streams, workers)}
        first = skip + (role - skip) % workers  # the first local batch >= skip that is this role's
        return owned, [layout.locate(g) for g in range(first, self.rank_batches(), workers)]

    def _open(self, local: int, done: int, order: np.ndarray) -> _Stream:
        """Local stream ``local`` positioned after its first ``done`` batches."""
        config = self.config
        stretch = self.local_stretches[local]
        plan = stream_plan(self.index, order, self.num_stretches, stretch)
        buffer = SentenceBuffer(
            plan.sent_lo,
            plan.sent_hi,
            config.buffer_images,
            np.random.default_rng([config.seed, self.epoch, stretch, _STRUCTURE]),
            shuffle=config.shuffle,
            recycle=config.drop_last,
        )
        for _ in range(done):  # exact resume: bookkeeping only, no data read
            buffer.take(config.batch_size, _placeholder)
        source = _ImageSource(self.index, plan, config.strict, self.counter)
        for entry in sorted(buffer.entries, key=lambda e: e.position):
            entry.data = source.get(entry.position)
        buffer.entries = [e for e in buffer.entries if e.data is not None]
        return _Stream(stretch, plan, buffer, source)

    def iter_role(self, role: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of worker role ``role`` (0..workers-1) from the resume point on."""
        config = self.config
        owned, schedule = self._schedule(role)
        order = shard_order(len(self.index.shards), config.seed, self.epoch, config.shuffle)
        streams = {local: self._open(local, done, order) for local, done in owned.items()}

        builder = BatchBuilder(
            self.encoder,
            self.index.boxes_per_image,
            self.index.feature_dim,
            config.mismatch_probability,
            config.word_mask_probability,
            config.object_mask_probability,
            config.with_ids,
            tuple(config.object_word_ids),
            config.object_word_mask_probability,
        )
        self._worker_setup()
        ring = self._ring(builder)
        for local, number in schedule:
            stream = streams[local]
            picks, candidates = stream.buffer.take(config.batch_size, stream.source.get)
            if not picks:
                if not config.drop_last:
                    return  # validation: corrupt samples only make the pass shorter
                raise DataError(
                    f"rank {self.rank} stream {stream.stretch}: no readable image left in its shards"
                )
            # Keyed by (stream, its batch number): the same batch whichever rank or worker builds it.
            rng = np.random.default_rng([config.seed, self.epoch, stream.stretch, _CONTENT, number])
            acquired = ring.acquire() if ring is not None else None
            if acquired is None:  # no ring, or every segment still holds a batch in use
                yield builder.build(picks, candidates, stream.plan, rng)
                continue
            index, buffers = acquired
            yield ring.pack(index, builder.build(picks, candidates, stream.plan, rng, buffers))

    def _worker_setup(self) -> None:
        if get_worker_info() is not None:
            # The forked worker inherits the parent's whole object graph (torch, the model's
            # Python objects); freezing it keeps the cyclic GC from re-scanning it for every
            # few thousand allocations, ~5% of a worker's time otherwise.
            gc.freeze()

    def _ring(self, builder: BatchBuilder) -> SharedRing | None:
        """The shared-memory ring of this worker process, or None (see LoaderConfig)."""
        info = get_worker_info()
        if self.ring_flags is None or info is None:
            return None  # no worker process: nothing crosses a process boundary
        flags = self.ring_flags.numpy()[info.id]
        return SharedRing(flags, info.id, builder.batch_spec(self.config.batch_size))


def _placeholder(position: int) -> bool:
    return True


class PretrainLoader:
    """Iterates one epoch of batches per ``for`` loop, tracking the position for resume.

    A completed pass advances the epoch; an interrupted one (``break``) continues where it
    stopped on the next ``for``. ``len(loader)`` is the number of batches of a full epoch,
    the same on every rank.
    """

    def __init__(
        self,
        index: ShardIndex,
        config: LoaderConfig,
        rank: int,
        world_size: int,
        fixed_epoch: bool,
        accumulation: int = 1,
    ):
        self.config = config
        self.index = index
        self._corrupt = multiprocessing.get_context("fork").Value("q", 0)
        self.dataset = PretrainStream(index, config, rank, world_size, self._corrupt, accumulation)
        self.fixed_epoch = fixed_epoch
        if config.buffer_images < config.batch_size:
            log.warning(
                "buffer_images %d < batch_size %d: batches will repeat images",
                config.buffer_images,
                config.batch_size,
            )
        self.epoch = 0
        self.batches_consumed = 0
        if config.drop_last and len(self) == 0:
            layout = self.dataset.layout
            need = layout.streams * config.batch_size
            raise ValueError(
                f"{index.sentences} sentences cannot fill one batch per stream: {layout.streams} streams "
                f"(micro-batches per step {layout.micro_batches} x interleave {layout.interleave}) x "
                f"batch_size {config.batch_size} = {need}; use a smaller batch or interleave, or more data"
            )

    def __len__(self) -> int:
        """Micro-batches of a full epoch on this rank (the same on every rank; training: steps
        per epoch x accumulation, with steps per epoch independent of the world size)."""
        return self.dataset.rank_batches()

    @property
    def corrupt_samples(self) -> int:
        """Samples skipped as corrupt so far, summed over this rank's workers."""
        return int(self._corrupt.value)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self.epoch, self.batches_consumed = int(epoch), 0

    def _layout(self) -> dict:
        """What shapes the epoch's order, beside the position (checked by load_state_dict)."""
        config, dataset = self.config, self.dataset
        layout = {"seed": config.seed, "batch_size": config.batch_size, "sentences": self.index.sentences}
        if dataset.layout is None:  # validation: split per (rank, worker)
            return layout | {"world_size": dataset.world_size, "workers": dataset.workers}
        return layout | {
            "micro_batches_per_step": dataset.layout.micro_batches,
            "interleave": config.interleave,
            "streams": dataset.layout.streams,
            "buffer_images": config.buffer_images,
        }

    def state_dict(self) -> dict:
        """The data position: enough to continue exactly where this rank stopped, on any world
        size and worker count (training). ``world_size``, ``accumulation`` and ``workers`` are
        recorded for the record; only the keys of the layout are checked on load."""
        dataset = self.dataset
        info = {"world_size": dataset.world_size, "workers": dataset.workers}
        if dataset.layout is not None:
            info["accumulation"] = dataset.layout.accumulation
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed} | info | self._layout()

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (or just ``{"epoch", "batches_consumed"}``).

        Training: ``batches_consumed`` counts this rank's micro-batches, so ``step_in_epoch x
        accumulation`` positions every rank at that global step, whatever the world size and
        worker count were. A state that records another ``accumulation`` (one saved on another
        world size) counts at that accumulation and is converted by its step; one that stops
        inside a step cannot be, and is refused, as is a state whose layout keys differ, naming
        the fix.
        """
        mine = self._layout()
        if self.dataset.layout is not None and "workers" in state and "streams" not in state:
            raise ValueError(
                "cannot resume the data position exactly: the state was written by the per-(rank, "
                "worker) slot layout of an earlier lxtrain, whose order this loader does not "
                f"reproduce; resume from the start of an epoch instead: {{'epoch': {state.get('epoch')}, "
                "'batches_consumed': 0}"
            )
        refuse_layout_change(state, mine)
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        layout = self.dataset.layout
        if layout is not None and state.get("accumulation", layout.accumulation) != layout.accumulation:
            # A saved state counts micro-batches at its own accumulation: carry over its step.
            saved = int(state["accumulation"])
            if self.batches_consumed % saved:
                raise ValueError(
                    f"cannot resume the data position exactly: the state stops inside an optimiser step "
                    f"(batches_consumed {self.batches_consumed} at accumulation {saved}), and this run "
                    f"accumulates {layout.accumulation}; resume from a checkpoint taken at a step "
                    f"boundary, or on {layout.micro_batches // saved} ranks"
                )
            self.batches_consumed = self.batches_consumed // saved * layout.accumulation

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = len(self)
        if self.batches_consumed >= total:
            self._advance()
        self.dataset.epoch = 0 if self.fixed_epoch else self.epoch
        self.dataset.skip = self.batches_consumed
        for batch in self._batches():
            self.batches_consumed += 1
            yield batch
            del batch  # not kept across the next fetch: its ring segment can be released then
        if self.config.drop_last and self.batches_consumed != total:
            raise DataError(f"rank {self.dataset.rank}: got {self.batches_consumed} batches, planned {total}")
        self._advance()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self._host_batches()  # forks any workers now, from this (the caller's) thread
        if self.config.pin_memory and torch.cuda.is_available():
            # Pinned copies from a few slots allocated once, staged on a thread (DataLoader's own
            # pin_memory allocates pinned memory per batch, a device-wide synchronisation).
            batches = stage_batches(batches, PinnedSlots(pin=True))
        yield from batches

    def _host_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        config = self.config
        if config.in_process and self.dataset.workers > 1:
            return self._round_robin()
        workers = 0 if config.in_process or not config.num_workers else self.dataset.workers
        receiver = None
        if workers and config.shared_buffers is not False:
            # Fresh flags per pass: the workers forked for it start with empty rings.
            flags = torch.zeros((workers, config.prefetch_factor + RING_EXTRA_SLOTS), dtype=torch.int32)
            self.dataset.ring_flags = flags.share_memory_()
            receiver = RingReceiver(self.dataset.ring_flags.numpy())
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=config.prefetch_factor if workers else None,
            multiprocessing_context="fork" if workers else None,
            # Workers seed themselves from (seed, epoch, rank, worker); a private generator keeps
            # DataLoader's own base-seed draw off the global torch RNG, which drives dropout and
            # must continue exactly after a resume.
            generator=torch.Generator(),
        )
        try:
            # Forking from the thread that owns the process (not a staging thread) keeps the
            # workers clear of locks another thread might hold at the fork.
            iterator = iter(loader)
        finally:
            self.dataset.ring_flags = None  # the forked workers have their copy
        return _received(iterator, receiver)

    def _round_robin(self) -> Iterator[dict[str, torch.Tensor]]:
        # PyTorch's polling order: role (i + skip) % W is polled i-th, round-robin, and an
        # exhausted worker drops out of the cycle.
        skip, workers = self.dataset.skip, self.dataset.workers
        streams = [self.dataset.iter_role((i + skip) % workers) for i in range(workers)]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch

    def _advance(self) -> None:
        self.batches_consumed = 0
        if not self.fixed_epoch:
            self.epoch += 1


def _received(iterator: Iterator, receiver: RingReceiver | None) -> Iterator[dict[str, torch.Tensor]]:
    """The data loader's batches as dicts: ring segments unpacked, and released once dropped."""
    try:
        for item in iterator:
            if receiver is not None:
                receiver.release_unused()  # the batches dropped since the last fetch
                if isinstance(item, RingBatch):
                    item = receiver.unpack(item)
            yield item
            del item
    except DataError as error:
        raise DataError(_worker_error_message(error)) from None


def _worker_error_message(error: DataError) -> str:
    """The message a data-loader worker raised, without the traceback torch wraps it in."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    last = text.rstrip().rsplit(marker, 1)
    return last[1].strip() if len(last) == 2 else text


def build_pretrain_loader(
    shards: str | Path,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 2,
    tokenizer: str | None = None,
    shard_index: str | Path | None = None,
    accumulation: int = 1,
    **options,
) -> PretrainLoader:
    """The training loader of one rank.

    Args:
        shards: a shard directory, its ``index.json``, a tar glob/brace pattern, or shard URLs
            (``pipe:...``, ``https://...``; a brace pattern of them) or an index URL; see
            :mod:`lxtrain.data.index`.
        batch_size: examples per micro-batch (train_micro_batch_size_per_gpu).
        rank, world_size: this rank and the number of ranks.
        seed: data seed.
        epoch: the epoch the first iteration yields.
        num_workers: data-loader processes per rank.
        tokenizer: None for the packaged BERT uncased vocabulary, else a path or local model name.
        shard_index: read the index from here (a local path or URL) instead of next to the shards.
        accumulation: micro-batches per optimiser step on this rank (gradient_accumulation_steps):
            world_size x accumulation x batch_size is the global batch, which fixes the order.
        **options: further :class:`LoaderConfig` fields.
    """
    config = LoaderConfig(
        batch_size=batch_size, seed=seed, num_workers=num_workers, tokenizer=tokenizer, **options
    )
    index = open_index(shards, shard_index)
    loader = PretrainLoader(index, config, rank, world_size, fixed_epoch=False, accumulation=accumulation)
    loader.set_epoch(epoch)
    return loader


def build_valid_loader(
    shards: str | Path,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    tokenizer: str | None = None,
    shard_index: str | Path | None = None,
    accumulation: int = 1,
    **options,
) -> PretrainLoader:
    """The deterministic validation loader: every sentence once, no shuffling, the same masks
    and mismatches on every pass for a seed. Workers end with a partial batch, so ranks may
    differ by one batch per worker: reduce validation sums after the loop, not per batch.
    The split is per (rank, worker); ``accumulation`` is accepted (so one set of options serves
    both builders) and ignored."""
    del accumulation
    options = {"shuffle": False, "drop_last": False, **options}
    config = LoaderConfig(
        batch_size=batch_size, seed=seed, num_workers=num_workers, tokenizer=tokenizer, **options
    )
    return PretrainLoader(open_index(shards, shard_index), config, rank, world_size, fixed_epoch=True)
