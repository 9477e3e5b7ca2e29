"""Host batch memory reused safely: the workers' shared ring (release by use count) and the pinned
staging slots (here unpinned: the same bookkeeping without CUDA), in isolation and under the loader."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain import batch as B
from lxtrain.data import ring
from lxtrain.data.loader import build_pretrain_loader, build_valid_loader
from lxtrain.data.ring import (
    FREE,
    IN_USE,
    PinnedSlots,
    RingBatch,
    RingReceiver,
    SharedRing,
    layout_of,
    stage_batches,
    storage_views,
)
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate

SPEC = {
    "features": ((4, 3, 5), torch.float16),
    "ids": ((4, 7), torch.int64),
    "flags": ((4, 3), torch.int8),
}


def _batch(value: int, size: int = 4) -> dict:
    return {
        "features": torch.full((size, 3, 5), float(value), dtype=torch.float16),
        "ids": torch.arange(size * 7).view(size, 7) + value,
        "flags": torch.full((size, 3), value % 100, dtype=torch.int8),
        "names": [f"n{value}"] * size,
    }


def _equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        torch.equal(left[k], right[k]) if torch.is_tensor(left[k]) else left[k] == right[k] for k in left
    )


def test_layout_aligns_every_tensor_and_views_share_one_storage() -> None:
    layout, nbytes = layout_of(SPEC)
    assert [key for key, *_ in layout] == list(SPEC)
    assert all(offset % ring.ALIGN == 0 for _, offset, _, _ in layout)
    assert nbytes == 128 + 256 + 64  # 120 -> 128, 224 -> 256, 12 -> 64
    storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
    views = storage_views(storage, layout)
    for key, (shape, dtype) in SPEC.items():
        assert views[key].shape == shape and views[key].dtype == dtype
        assert views[key].untyped_storage().data_ptr() == storage.data_ptr()
    views["ids"].fill_(7)
    views["flags"].fill_(-1)
    assert (views["ids"] == 7).all() and (views["flags"] == -1).all()  # no overlap


def _worker_round(shared: SharedRing, value: int, size: int = 4) -> RingBatch | dict:
    """What a worker does for one batch (build into a free slot if any, else fresh memory), and
    what arrives in the main process: the slot's shared segment mapped a second time, as a
    separate storage (the worker's own reference stays on its side of the process boundary)."""
    acquired = shared.acquire()
    if acquired is None:
        return _batch(value, size)
    index, buffers = acquired
    built = {
        key: buffers[key][:size].copy_(tensor)
        for key, tensor in _batch(value, size).items()
        if key != "names"
    }
    item = shared.pack(index, built | {"names": [f"n{value}"] * size})
    fd, nbytes = item.data.untyped_storage()._share_fd_cpu_()
    mapped = torch.UntypedStorage._new_shared_fd_cpu(os.dup(fd), nbytes)
    item.data = torch.empty(0, dtype=torch.uint8).set_(mapped, 0, (nbytes,))
    return item


def _arrive(receiver: RingReceiver, item: RingBatch | dict) -> dict:
    return receiver.unpack(item) if isinstance(item, RingBatch) else item


def test_shared_ring_reuses_a_slot_only_after_its_batch_is_dropped() -> None:
    flags = np.zeros((2, 3), dtype=np.int32)
    shared = SharedRing(flags[1], worker=1, spec=SPEC)
    receiver = RingReceiver(flags)

    first = receiver.unpack(_worker_round(shared, 1))
    assert _equal(first, _batch(1)) and flags[1, 0] == IN_USE
    receiver.release_unused()
    assert flags[1, 0] == IN_USE, "released while the consumer holds the batch"
    view = first["ids"][1:]  # a view alone keeps it alive too
    del first
    receiver.release_unused()
    assert flags[1, 0] == IN_USE
    del view
    assert receiver.release_unused() == 1 and flags[1, 0] == FREE

    second = receiver.unpack(_worker_round(shared, 2))
    assert len(shared.slots) == 1, "the released slot is reused"
    # Held batches are never overwritten: new slots up to the capacity, then fresh memory.
    items = [_worker_round(shared, v) for v in (3, 4, 5)]
    assert [isinstance(item, RingBatch) for item in items] == [True, True, False]
    held = [second] + [_arrive(receiver, item) for item in items]
    del items
    assert len(shared.slots) == 3 and flags[1].tolist() == [IN_USE] * 3
    assert all(_equal(batch, _batch(v)) for batch, v in zip(held, (2, 3, 4, 5), strict=True))
    # A partial last batch in a slot: shorter views of the same memory.
    del held[1]
    receiver.release_unused()
    partial = receiver.unpack(_worker_round(shared, 6, size=2))
    assert _equal(partial, _batch(6, size=2)) and partial["features"].shape == (2, 3, 5)
    assert flags[0].tolist() == [FREE] * 3, "another worker's row is untouched"


def test_shared_ring_refuses_a_batch_not_built_in_its_slot() -> None:
    shared = SharedRing(np.zeros(2, dtype=np.int32), worker=0, spec=SPEC)
    index, _ = shared.acquire()
    with pytest.raises(ValueError, match="features"):
        shared.pack(index, {k: v for k, v in _batch(1).items() if k != "names"})


def _source(values, fail_at: int | None = None):
    for value in values:
        if value == fail_at:
            raise RuntimeError(f"broken batch {value}")
        yield _batch(value)


def test_staging_copies_every_batch_and_reuses_slots_the_consumer_dropped() -> None:
    slots = PinnedSlots(pin=False)
    seen = []
    for batch in stage_batches(_source(range(30)), slots, ahead=2):
        seen.append(batch["ids"].untyped_storage().data_ptr())
        assert _equal(batch, _batch(len(seen) - 1))
        del batch
    # One in the consumer's hands, one just dropped (reusable at the next fetch), two queued
    # ahead and one being filled: a handful of slots for 30 batches, allocated once.
    assert len(slots.storages) <= 5
    assert len(set(seen)) == len(slots.storages)


def test_staging_never_overwrites_a_batch_the_consumer_keeps() -> None:
    slots = PinnedSlots(pin=False)
    kept = list(stage_batches(_source(range(12)), slots, ahead=2))
    assert all(_equal(batch, _batch(value)) for value, batch in enumerate(kept))
    assert len(slots.storages) == 12
    del kept
    gc.collect()
    # Dropped: a second pass over the same slots allocates nothing new.
    for batch in stage_batches(_source(range(12)), slots, ahead=2):
        del batch
    assert len(slots.storages) == 12


def test_staging_raises_the_source_error_and_stops_its_thread() -> None:
    before = threading.active_count()
    staged = stage_batches(_source(range(10), fail_at=3), PinnedSlots(pin=False))
    got = []
    with pytest.raises(RuntimeError, match="broken batch 3"):
        for batch in staged:
            got.append(int(batch["ids"][0, 0]))
    assert got == [0, 1, 2]
    # A consumer that stops early: closing the generator joins the thread and closes the source.
    source = _source(range(100))
    early = stage_batches(source, PinnedSlots(pin=False))
    next(early)
    early.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(source)  # closed


# ---------------------------------------------------------------------------------------------
# Under the real loader, with worker processes.


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ring")
    world = World(feature_dim=32, boxes=10, max_objects=4)
    generate(SyntheticConfig(out=out, images=200, valid_images=1, world=world, shards=True, shard_size=50))
    return out / "shards" / "train"


def _loader(shards: Path, **options):
    settings = dict(batch_size=16, seed=3, num_workers=2, buffer_images=64, with_ids=True)
    return build_pretrain_loader(shards, **(settings | options))


@pytest.mark.multiproc
def test_loader_ring_is_on_by_default_reused_and_safe_to_keep(shards: Path) -> None:
    reference = list(_loader(shards, in_process=True))
    # A loop that drops each batch: a few segments per worker, reused over the epoch.
    pointers = []
    for batch in _loader(shards):
        pointers.append(batch[B.UNMASKED_FEATURES].untyped_storage().data_ptr())
        assert all(
            t.untyped_storage().data_ptr() == pointers[-1] for t in batch.values() if torch.is_tensor(t)
        ), "one segment per batch"
        del batch
    assert len(pointers) == len(reference) > 20
    assert len(set(pointers)) <= 2 * 3, "segments were not reused"
    # A loop that keeps every batch: all intact, the same as in-process.
    kept = list(_loader(shards))
    assert len(kept) == len(reference)
    for left, right in zip(kept, reference, strict=True):
        assert all(torch.equal(left[key], right[key]) for key in right)


@pytest.mark.multiproc
def test_staged_loader_batches_equal_the_loader_batches(shards: Path) -> None:
    reference = list(_loader(shards, in_process=True))
    slots = PinnedSlots(pin=False)
    count = 0
    for batch, expected in zip(stage_batches(iter(_loader(shards)), slots), reference, strict=True):
        assert all(torch.equal(batch[key], expected[key]) for key in expected)
        count += 1
        del batch
    assert count == len(reference) and len(slots.storages) <= 5


@pytest.mark.multiproc
def test_validation_loader_partial_batches_through_the_ring(shards: Path) -> None:
    settings = dict(batch_size=24, seed=3, num_workers=2, with_ids=True)
    reference = list(build_valid_loader(shards, in_process=True, **settings))
    through_ring = list(build_valid_loader(shards, **settings))
    sizes = [len(batch[B.INPUT_IDS]) for batch in reference]
    assert min(sizes) < 24, "no partial batch: the test would not exercise one"
    assert [len(batch[B.INPUT_IDS]) for batch in through_ring] == sizes
    for left, right in zip(through_ring, reference, strict=True):
        assert all(torch.equal(left[key], right[key]) for key in right)
