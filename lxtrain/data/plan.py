"""Which sentences each (rank, worker) reads in an epoch: a pure function of the index.

The shard order of an epoch is a permutation seeded by (seed, epoch), the same on every rank.
Laid end to end, the shards' sentences form one sequence of S sentences; it is cut into
K = world_size x workers contiguous *slots* of S // K or S // K + 1 sentences, slot
``rank * workers + worker``. A slot reads only its own stretch of the shard sequence (at most
two shards partially), so ranks are disjoint, and every slot holds the same number of
sentences up to one, so every rank can produce the same number of batches. Cuts fall between
sentences, so an image at a boundary has its sentences split between two slots.
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


def slot_bounds(total_sentences: int, num_slots: int, slot: int) -> tuple[int, int]:
    """[lo, hi) of the slot's stretch of the epoch's sentence sequence."""
    return slot * total_sentences // num_slots, (slot + 1) * total_sentences // num_slots


@dataclass
class SlotPlan:
    """The images of one slot in stream order, with the sentences the slot owns of each.

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


def slot_plan(index: ShardIndex, order: np.ndarray, num_slots: int, slot: int) -> SlotPlan:
    """The plan of ``slot`` (of ``num_slots``) for shards read in ``order``."""
    shards = [index.shards[i] for i in order]
    counts = np.concatenate([s.sentences_per_image for s in shards])
    ends = np.cumsum(counts)
    starts = ends - counts
    lo, hi = slot_bounds(int(ends[-1]), num_slots, slot)
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(starts, hi, side="left"))
    chosen = slice(first, last)
    shard_ids = np.concatenate(
        [np.full(s.images, i, dtype=np.int64) for i, s in zip(order, shards, strict=True)]
    )
    positions = np.concatenate([np.arange(s.images, dtype=np.int64) for s in shards])
    image_ids = np.concatenate([s.image_base + np.arange(s.images, dtype=np.int64) for s in shards])
    bases = np.concatenate([s.sentence_base for s in shards])
    return SlotPlan(
        shard=shard_ids[chosen],
        position=positions[chosen],
        image_id=image_ids[chosen],
        sentence_base=bases[chosen],
        sent_lo=np.maximum(starts[chosen], lo) - starts[chosen],
        sent_hi=np.minimum(ends[chosen], hi) - starts[chosen],
    )
