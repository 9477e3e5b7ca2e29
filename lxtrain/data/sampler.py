"""The image buffer that turns a stream of images into batches of sentence-level examples.

The buffer holds up to ``capacity`` images, each with a queue of the sentences it still owes
this epoch (shuffled when it enters). A batch takes one sentence from each of ``batch_size``
*distinct* buffered images, drawn without replacement with probability proportional to their
remaining sentences (Gumbel-top-k with exponential keys, one vectorised draw per batch), so a
batch repeats an image only once fewer images than ``batch_size`` are left (the end of the
stream). Weighting by remaining sentences drains sentence-rich images as fast as poor ones.

This class only does bookkeeping on positions: it never touches image data, so a resumed
loader replays it over the skipped batches at a few microseconds per batch without reading
a shard, and then loads just the images that are in the buffer at the resume point.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class BufferedImage:
    """One buffered image: its stream position, sentences still owed, and loaded data."""

    __slots__ = ("position", "remaining", "data")

    def __init__(self, position: int, remaining: list[int], data: object) -> None:
        self.position = position
        self.remaining = remaining  # popped from the end
        self.data = data


Loader = Callable[[int], object | None]
"""Called with a stream position when its image enters the buffer; None drops the image."""


class SentenceBuffer:
    """Structural sampling state of one stream (see the module docstring).

    Args:
        sent_lo, sent_hi: per stream position, the range of the image's sentences this stream owns.
        capacity: images held at once.
        rng: the only source of randomness (sentence order within an image, image choice).
        shuffle: shuffle each image's sentences (off: sentence order as stored).
        recycle: when the stream runs dry (only possible after dropped corrupt images),
            start it again instead of ending, so the planned number of batches is still met.
    """

    def __init__(
        self,
        sent_lo: np.ndarray,
        sent_hi: np.ndarray,
        capacity: int,
        rng: np.random.Generator,
        shuffle: bool = True,
        recycle: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.sent_lo, self.sent_hi = sent_lo, sent_hi
        self.capacity = capacity
        self.rng = rng
        self.shuffle = shuffle
        self.recycle = recycle
        self.entries: list[BufferedImage] = []
        self.next_position = 0
        self.passes = 0

    def _fill(self, load: Loader) -> None:
        while len(self.entries) < self.capacity and self.next_position < len(self.sent_lo):
            position = self.next_position
            self.next_position += 1
            owned = np.arange(self.sent_lo[position], self.sent_hi[position])
            # Drawn before loading so a dropped image leaves the random stream unchanged.
            order = self.rng.permutation(owned) if self.shuffle else owned[::-1]
            data = load(position)
            if data is not None:
                self.entries.append(BufferedImage(position, order.tolist(), data))

    def take(self, count: int, load: Loader) -> tuple[list[tuple[BufferedImage, int]], list[BufferedImage]]:
        """Draw up to ``count`` (image, sentence index) picks; fewer only at the stream's end.

        Returns the picks and the images buffered when the batch was drawn (candidates for
        mismatched sentences and donor features).
        """
        picks: list[tuple[BufferedImage, int]] = []
        snapshot: list[BufferedImage] | None = None
        while len(picks) < count:
            self._fill(load)
            if not self.entries:
                if not self.recycle or self.passes >= 2 or len(self.sent_lo) == 0:
                    break
                self.passes += 1
                self.next_position = 0
                continue
            if snapshot is None:
                snapshot = list(self.entries)
            need = count - len(picks)
            weights = np.fromiter((len(e.remaining) for e in self.entries), np.float64, len(self.entries))
            keys = self.rng.exponential(size=len(self.entries)) / weights
            if need < len(self.entries):
                chosen = np.argpartition(keys, need - 1)[:need]
                chosen = chosen[np.argsort(keys[chosen], kind="stable")]
            else:
                chosen = np.argsort(keys, kind="stable")
            for i in chosen.tolist():
                entry = self.entries[i]
                picks.append((entry, entry.remaining.pop()))
            self.entries = [e for e in self.entries if e.remaining]
        return picks, snapshot or []
