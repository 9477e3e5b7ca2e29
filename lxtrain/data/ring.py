"""Host memory for batches, allocated once and reused: the workers' shared-memory ring and the
pinned staging slots. Both reuse a batch's memory only once nothing refers to that batch any more.

Why: fresh memory per batch is the largest host cost of a loader. A worker that sends a new
tensor makes PyTorch copy it into a new shared-memory segment (zero-filled page by page), and
``DataLoader(pin_memory=True)`` copies every batch into new pinned memory, whose allocation
(``cudaHostAlloc``) synchronises the device. Here:

* **Shared ring** (data-loader workers): a worker builds each batch into one of a few shared
  segments, one segment per batch holding every tensor (so one file descriptor crosses the
  process boundary, not one per key). The main process tells the worker which segments it may
  overwrite through a small shared flag array: a segment is released once no tensor of its batch
  is alive in the main process (its storage's use count). A consumer may keep batches as long as
  it likes; while it does, the worker falls back to fresh memory instead of overwriting them.
* **Pinned slots** (with CUDA): a background thread copies each arriving batch into one of a few
  pinned slots allocated once. A slot is refilled only when no tensor of its batch is alive and
  the consumer has since asked for another batch: at that request an event is recorded on the
  consumer's current stream, after every copy it issued from the batch, and the refill waits for
  that event (normally long complete), never for the whole device.

A batch is always a plain ``dict``; the packing is internal. The storage use count is read with
``torch._C._storage_Use_Count`` (what ``torch.multiprocessing``'s own storage bookkeeping rests
on); where a PyTorch release lacks it, nothing is ever released: batches are then built in fresh
memory once the ring is full, which is correct, only slower.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger("lxtrain.data")

ALIGN = 64
"""Byte alignment of each tensor inside a packed batch (cache lines; any dtype's itemsize)."""

FREE, IN_USE = 0, 1
"""Values of a ring slot's flag: the worker sets IN_USE when it builds into the slot, the main
process sets FREE when no tensor of that batch is alive any more."""

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)

Layout = tuple[tuple[str, int, tuple[int, ...], torch.dtype], ...]
"""(key, byte offset, shape, dtype) of each tensor of a packed batch, in order."""


def layout_of(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[Layout, int]:
    """The packed layout of tensors with these (shape, dtype), and its size in bytes."""
    entries, offset = [], 0
    for key, (shape, dtype) in spec.items():
        entries.append((key, offset, tuple(shape), dtype))
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        offset += -(-nbytes // ALIGN) * ALIGN
    return tuple(entries), offset


def storage_views(storage: torch.UntypedStorage, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of ``layout`` as views of ``storage`` (offsets from its start)."""
    out = {}
    for key, offset, shape, dtype in layout:
        itemsize = torch.empty((), dtype=dtype).element_size()
        out[key] = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
    return out


def shared_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory.

    ``UntypedStorage._new_shared`` (what torch.multiprocessing uses) allocates the shared
    segment directly, about twice as fast as ``torch.empty(...).share_memory_()``, which first
    allocates private memory and then copies it.
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(max(nbytes, 1)), 0, (nbytes,))


def _unreferenced(storage: torch.UntypedStorage) -> bool:
    """True when the caller's own Python reference is the only one left to ``storage``: no tensor
    or view of it is alive. (Python storage objects are one per storage, so holding one counts once.)"""
    return _use_count is not None and _use_count(storage._cdata) <= 1


@dataclass
class RingBatch:
    """What a worker sends for a batch built in its ring: one shared segment and its layout."""

    worker: int
    slot: int
    data: torch.Tensor | None  # uint8, the slot's whole segment; None once unpacked
    layout: Layout
    extra: dict[str, Any] = field(default_factory=dict)  # non-tensor entries, as they are


class SharedRing:
    """A worker's ring of shared-memory batch segments (worker side).

    Args:
        flags: (capacity,) int32 view of this worker's row of the shared flag array.
        worker: the data-loader worker id (the flag array's row).
        spec: shape and dtype of every tensor of a full batch.
    """

    def __init__(
        self, flags: np.ndarray, worker: int, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ):
        self.flags, self.worker = flags, worker
        self.layout, self.nbytes = layout_of(spec)
        self.slots: list[torch.Tensor] = []

    def acquire(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """A free slot (index, tensor views to build into), allocating one while under capacity;
        None when every slot holds a batch still in use (build in fresh memory then)."""
        free = np.flatnonzero(self.flags[: len(self.slots)] == FREE)
        if len(free):
            index = int(free[0])  # the lowest: recently used memory, still mapped and warm
        elif len(self.slots) < len(self.flags):
            index = len(self.slots)
            self.slots.append(shared_bytes(self.nbytes))
        else:
            return None
        self.flags[index] = IN_USE
        return index, storage_views(self.slots[index].untyped_storage(), self.layout)

    def pack(self, index: int, batch: Mapping[str, Any]) -> RingBatch:
        """The batch built into slot ``index`` (its tensors views of the slot, possibly shorter
        than the full spec: a partial last batch), ready to send."""
        by_key = {key: offset for key, offset, _, _ in self.layout}
        layout = tuple(
            (key, by_key[key], tuple(value.shape), value.dtype)
            for key, value in batch.items()
            if torch.is_tensor(value)
        )
        for key, value in batch.items():
            if torch.is_tensor(value):
                expected = self.slots[index].data_ptr() + by_key[key]
                if value.data_ptr() != expected or not value.is_contiguous():
                    raise ValueError(f"{key} was not built into its ring slot")
        extra = {key: value for key, value in batch.items() if not torch.is_tensor(value)}
        return RingBatch(self.worker, index, self.slots[index], layout, extra)


class RingReceiver:
    """Main-process side of the workers' rings: unpacks their batches and releases slots.

    Args:
        flags: (workers, capacity) int32 shared flag array, the one the workers were forked with.
    """

    def __init__(self, flags: np.ndarray) -> None:
        self.flags = flags
        # A reference per slot keeps its segment mapped here, so the next batch in that slot is
        # recognised (torch's shared-storage cache) instead of mapped and page-faulted afresh.
        self.storages: dict[tuple[int, int], torch.UntypedStorage] = {}
        self.outstanding: set[tuple[int, int]] = set()

    def unpack(self, item: RingBatch) -> dict[str, Any]:
        """The batch as a dict of tensors viewing the slot; ``item`` gives up its reference."""
        flat, item.data = item.data, None
        key = (item.worker, item.slot)
        self.storages[key] = flat.untyped_storage()
        del flat
        self.outstanding.add(key)
        return storage_views(self.storages[key], item.layout) | item.extra

    def release_unused(self) -> int:
        """Mark FREE every outstanding slot whose batch is no longer referenced; returns how many."""
        released = [key for key in self.outstanding if _unreferenced(self.storages[key])]
        for worker, slot in released:
            self.flags[worker, slot] = FREE
        self.outstanding.difference_update(released)
        return len(released)


class PinnedSlots:
    """Host staging slots for batches, allocated once (pinned with ``pin=True``) and reused.

    A slot goes "filled" (:meth:`fill`, on the staging thread) -> "held" (:meth:`hand_out`, when
    the consumer receives its batch) -> "fenced" (:meth:`fence`, when the consumer next asks for
    a batch: one CUDA event recorded on its current stream covers every copy it issued from the
    batches it held) -> refilled once no tensor of its batch is alive, after waiting for that
    event. With ``pin=False`` (no CUDA) there are no events: the same bookkeeping, testable on a CPU.
    """

    GROWTH_WARNING = 16

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.storages: list[torch.UntypedStorage] = []  # our only reference to each slot
        self.state: list[str] = []  # "filled", "held", "fenced" or "busy" (being filled)
        self.events: list[Any] = []
        self._lock = threading.Lock()

    def fill(self, batch: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """(slot, a copy of ``batch`` in that slot); non-tensor entries pass through as they are."""
        tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
        layout, nbytes = layout_of({key: (tuple(v.shape), v.dtype) for key, v in tensors.items()})
        index, event = self._take(nbytes)
        if event is not None:
            event.synchronize()  # the consumer's copies out of the slot's previous batch are done
        staged = storage_views(self.storages[index], layout)
        for key, value in tensors.items():
            staged[key].copy_(value)
        with self._lock:
            self.state[index] = "filled"
        return index, {key: staged.get(key, value) for key, value in batch.items()}

    def _take(self, nbytes: int) -> tuple[int, Any]:
        """A slot for ``nbytes`` and the event to wait for first (None: a new slot). Only the
        staging thread calls this; the lock guards the states against :meth:`fence`."""
        with self._lock:
            for index, storage in enumerate(self.storages):
                if self.state[index] == "fenced" and storage.nbytes() >= nbytes and _unreferenced(storage):
                    self.state[index] = "busy"
                    return index, self.events[index]
        # Allocated outside the lock: pinning memory takes long (and synchronises the device),
        # and the consumer's fence() must not wait for it.
        flat = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        with self._lock:
            self.storages.append(flat.untyped_storage())
            self.state.append("busy")
            self.events.append(None)
            index = len(self.storages) - 1
        del flat  # the storage list holds the only reference
        if index + 1 == self.GROWTH_WARNING:
            log.warning(
                "%d staging slots: the training loop keeps many host batches alive, each holding "
                "a slot; copy them to the device and drop them so that slots are reused",
                index + 1,
            )
        return index, None

    def hand_out(self, index: int) -> None:
        """The consumer received the batch of slot ``index``."""
        with self._lock:
            self.state[index] = "held"

    def fence(self) -> None:
        """The consumer asks for a batch: the work it queued for the batches it holds is issued."""
        event = None
        if self.pin and torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()  # on the consumer's current stream, after its copies
        with self._lock:
            for index, state in enumerate(self.state):
                if state == "held":
                    self.state[index], self.events[index] = "fenced", event


_END = object()


def stage_batches(batches: Iterator[Mapping[str, Any]], slots: PinnedSlots, ahead: int = 2) -> Iterator[dict]:
    """Copy each batch of ``batches`` into ``slots`` on a background thread, ``ahead`` batches ahead.

    Exceptions of ``batches`` are raised here; closing this generator stops the thread (which
    finishes the batch it is reading) and closes ``batches`` from this thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for batch in batches:
                staged = slots.fill(batch)
                del batch  # the source's memory (e.g. a ring slot) is free from here on
                if not put(staged):
                    return
                del staged
            put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)

    thread = threading.Thread(target=run, name="lxtrain-pin", daemon=True)
    thread.start()
    try:
        while True:
            slots.fence()
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            index, batch = item
            del item
            slots.hand_out(index)
            yield batch
            del batch  # before the next fence: a batch the consumer dropped is reusable then
    finally:
        stop.set()
        thread.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
