"""Per-name loss and accuracy sums kept on the training device between two log steps.

A training step never waits for the device to read a metric back: :meth:`StepMeter.add` only
queues a few device ops, and the sums are read (and all-reduced over the ranks) at log steps.
The meter also counts micro-batches whose total loss is not finite, and the longest run of them,
which the training loop turns into warnings and the ``--max-bad-steps`` stop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from lxtrain import distributed


class StepMeter:
    """Sums over micro-batches of per-name losses and accuracy counts, and non-finite totals.

    Args:
        names: the metric names, in the order they are reported (e.g. the pre-training tasks).
        device: where the sums live: the training device.

    A micro-batch with a non-finite total adds nothing to the sums (its step is skipped).
    """

    def __init__(self, names: tuple[str, ...], device: torch.device | str = "cpu") -> None:
        self.names = names
        self.device = torch.device(device)
        self._indices: dict[tuple[str, ...], torch.Tensor] = {}
        # Consecutive non-finite micro-batches, carried across log windows.
        self.nonfinite_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.reset()

    def reset(self) -> None:
        # Rows: loss sum, loss count, correct, labelled; one column per name.
        self.sums = torch.zeros(4, len(self.names), dtype=torch.float64, device=self.device)
        # Non-finite micro-batches, the longest run of them, and one count the caller defines
        # (pre-training: masked-LM labels over capacity), all for this window.
        self.events = torch.zeros(3, dtype=torch.int64, device=self.device)

    def _index(self, names: tuple[str, ...]) -> torch.Tensor:
        # Made once per name set: a fresh index tensor each step would be a host-to-device copy.
        if names not in self._indices:
            positions = [self.names.index(name) for name in names]
            self._indices[names] = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return self._indices[names]

    def add_values(
        self,
        total: torch.Tensor,
        losses: Mapping[str, torch.Tensor],
        correct: Mapping[str, torch.Tensor] | None = None,
        labelled: Mapping[str, torch.Tensor] | None = None,
        extra_count: torch.Tensor | None = None,
    ) -> None:
        """Count one micro-batch: its total loss, per-name losses, and per-name (correct,
        labelled) counts for accuracies; ``extra_count`` adds to the caller's own event count."""
        finite = torch.isfinite(total.detach())
        names = tuple(name for name in self.names if name in losses)
        stacked = torch.stack([losses[name].detach() for name in names]).double()
        self.sums[0].index_add_(0, self._index(names), torch.where(finite, stacked, 0.0))
        self.sums[1].index_add_(0, self._index(names), finite.double().expand(len(names)))
        counted = tuple(name for name in self.names if name in (correct or {}))
        if counted:
            hits = torch.stack([correct[name] for name in counted]).double()  # type: ignore[index]
            count = torch.stack([labelled[name] for name in counted]).double()  # type: ignore[index]
            self.sums[2].index_add_(0, self._index(counted), torch.where(finite, hits, 0.0))
            self.sums[3].index_add_(0, self._index(counted), torch.where(finite, count, 0.0))
        bad = (~finite).long()
        self.nonfinite_run.add_(1).mul_(bad)
        self.events[0].add_(bad)
        torch.maximum(self.events[1], self.nonfinite_run, out=self.events[1])
        if extra_count is not None:
            self.events[2].add_(extra_count)

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """(mean loss per name, accuracy per name) over all ranks; a collective."""
        # Always a copy (.cpu() of a CPU tensor is the tensor itself): the all-reduce is in place.
        stacked = self.sums.to("cpu", copy=True)
        if dist.is_initialized():
            distributed.all_reduce_(stacked)
        loss_sum, loss_count, correct, labelled = stacked
        losses = {
            n: float(loss_sum[i] / loss_count[i]) for i, n in enumerate(self.names) if loss_count[i] > 0
        }
        accuracies = {n: float(correct[i] / labelled[i]) for i, n in enumerate(self.names) if labelled[i] > 0}
        return losses, accuracies

    def health(self) -> tuple[int, int, int]:
        """(non-finite micro-batches, longest run of them, the caller's count) in this window:
        summed over ranks, the run the longest on any rank; a collective."""
        # Copies (one each, on any device): the two in-place reductions differ.
        summed, longest = self.events.to("cpu", copy=True), self.events[1:2].to("cpu", copy=True)
        if dist.is_initialized():
            distributed.all_reduce_(summed)
            distributed.all_reduce_(longest, op=dist.ReduceOp.MAX)
        return int(summed[0]), int(longest[0]), int(summed[2])
