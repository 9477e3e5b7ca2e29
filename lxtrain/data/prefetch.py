"""Batches on the training device, one ahead: the host-to-device copy overlaps the step before.

    batches = DevicePrefetcher(loader, engine.device)
    for batch in batches:              # today's keys (lxtrain.batch), already on the device
        output = engine(batch, task_weights)

On CUDA each host batch is copied with ``non_blocking=True`` on a side stream while the
compute stream runs the previous step; the compute stream waits for that copy (an event, not a
host synchronisation) before it applies object masking
(:func:`lxtrain.tasks.masking.apply_object_masks`) and hands the batch over. Copies out of
pinned memory (``pin_memory=True``) are truly asynchronous; from pageable memory they are
still correct, only not overlapped. On a CPU device each batch is moved and masked in place of
the copy, synchronously.

Resume: the prefetcher reads one batch ahead, so a loader's ``state_dict()`` taken inside the
loop counts one batch more than the loop has consumed. Checkpoint the count of batches the loop
consumed (as ``lxtrain.pretrain`` does) rather than the loader's counter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lxtrain.batch import move
from lxtrain.tasks.masking import apply_object_masks


class DevicePrefetcher:
    """Iterates ``batches`` (host batches from the loader) as finished batches on ``device``.

    Args:
        batches: any iterable of batch dicts; iterated once per ``for`` loop over the prefetcher
            (a :class:`lxtrain.data.loader.PretrainLoader` continues where it stopped).
        device: where the batches go. Non-tensor entries pass through unchanged, as in
            :func:`lxtrain.batch.to_device`.
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], device: torch.device | str) -> None:
        self.batches = batches
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield apply_object_masks(move(batch, self.device))
            return
        yield from self._cuda()

    def _cuda(self) -> Iterator[dict[str, Any]]:
        source = iter(self.batches)
        try:
            yield from self._overlapped(source)
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a loader's generator: stop its workers now, not at collection
                close()

    def _overlapped(self, source: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        copy_stream = torch.cuda.Stream(self.device)
        pending = self._copy(source, copy_stream)
        while pending is not None:
            batch, copied = pending
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for value in batch.values():
                if torch.is_tensor(value) and value.device.type == "cuda":
                    # Allocated on the copy stream but used and freed on the compute stream: without
                    # this the allocator could hand the memory to the next copy while still in use.
                    value.record_stream(compute)
            # Issue the next batch's copy before handing this one over, so it overlaps the step.
            pending = self._copy(source, copy_stream)
            yield apply_object_masks(batch)  # on the compute stream, after the copy
            del batch

    def _copy(
        self, source: Iterator[Mapping[str, Any]], stream: torch.cuda.Stream
    ) -> tuple[dict[str, Any], torch.cuda.Event] | None:
        """The next host batch, its copy queued on ``stream``; None at the end of ``source``."""
        with torch.cuda.stream(stream):
            # Fetched with the copy stream current: a loader that stages pinned batches records
            # the fence of the previous batches on this stream, after their copies were queued.
            host = next(source, None)
            if host is None:
                return None
            batch = move(host, self.device)
            copied = torch.cuda.Event()
            copied.record(stream)
        return batch, copied
