"""Word and object masking for the pre-training tasks (SPEC 3).

Pure functions of their inputs and an explicit ``numpy.random.Generator``: they run inside
data-loader workers, so the same (seed, epoch, rank, worker) always gives the same masks, and
nothing here touches global random state. Object masking is split in two: the workers draw
(:func:`draw_object_masks`) and :func:`apply_object_masks` applies the draws with torch on the
training device, so the loader ships the features once, unmasked, in float16.

Both functions work on whole batches (any leading shape) because per-example Python loops are
the slowest part of a loader: one vectorised draw per batch keeps masking off the critical path.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lxtrain import batch as B

IGNORE_INDEX = -100
"""Label value for positions that carry no target (PyTorch's cross-entropy default)."""

MASK_PROBABILITY = 0.15
# Of the selected items: 80% replaced by the mask, 10% by a random item, 10% left unchanged.
REPLACE_WITH_MASK = 0.8
REPLACE_WITH_RANDOM = 0.1


def _split_selected(selected: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split selected positions into (to-mask, to-randomise); the rest stay unchanged."""
    draw = rng.random(selected.shape)
    to_mask = selected & (draw < REPLACE_WITH_MASK)
    to_random = selected & (draw >= REPLACE_WITH_MASK) & (draw < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    return to_mask, to_random


def mask_words(
    token_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    probability: float = MASK_PROBABILITY,
    object_word_ids: Iterable[int] = (),
    object_word_probability: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask word-pieces for masked cross-modality LM.

    Args:
        token_ids: integer array (..., T) of word-piece ids, padded with a special id (0).
        rng: the generator all draws come from.
        mask_token_id: id of ``[MASK]``.
        vocab_size: random replacements are drawn uniformly from ``[0, vocab_size)``.
        special_token_ids: ids never selected (``[CLS]``, ``[SEP]``, ``[PAD]``).
        probability: selection rate per eligible word-piece.
        object_word_ids, object_word_probability: word-pieces in ``object_word_ids`` are selected
            at ``object_word_probability`` instead (None: at ``probability``, as in LXMERT). An
            extension, not LXMERT's recipe: words naming objects carry the grounding signal.

    Returns:
        ``(masked_ids, labels)``: the input with replacements applied, and labels holding the
        original id at selected positions and ``IGNORE_INDEX`` elsewhere.
    """
    token_ids = np.asarray(token_ids)
    eligible = ~np.isin(token_ids, np.fromiter(special_token_ids, dtype=np.int64))
    rate: float | np.ndarray = probability
    if object_word_probability is not None:
        is_object_word = np.isin(token_ids, np.fromiter(object_word_ids, dtype=np.int64))
        rate = np.where(is_object_word, object_word_probability, probability)
    # One draw per position either way, so the option leaves the random stream unchanged.
    selected = eligible & (rng.random(token_ids.shape) < rate)
    to_mask, to_random = _split_selected(selected, rng)

    masked = token_ids.copy()
    masked[to_mask] = mask_token_id
    masked[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    labels = np.where(selected, token_ids, IGNORE_INDEX).astype(np.int64)
    return masked, labels


def mask_objects(
    features: np.ndarray,
    rng: np.random.Generator,
    *,
    donor_features: np.ndarray,
    probability: float = MASK_PROBABILITY,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask RoI features for feature regression and label classification.

    Args:
        features: array (..., O, D) of RoI features.
        rng: the generator all draws come from.
        donor_features: array (N, D) of boxes from *other* images; a randomised box takes the
            feature of one of them, drawn uniformly (the caller guarantees they are from other
            images, e.g. the previous image in the loader's buffer).
        probability: selection rate per box.

    Returns:
        ``(masked_features, selected)``: features with the selected boxes zeroed (80%), replaced
        by a donor box (10%) or kept (10%); ``selected`` is a float32 array (..., O) with 1 at every
        selected box (the feature-regression targets), including the unchanged ones.
    """
    features = np.asarray(features)
    if donor_features.ndim != 2 or donor_features.shape[-1] != features.shape[-1] or not len(donor_features):
        raise ValueError(
            f"donor_features must have shape (N>0, {features.shape[-1]}); got {donor_features.shape}"
        )
    selected = rng.random(features.shape[:-1]) < probability
    to_mask, to_random = _split_selected(selected, rng)

    masked = features.copy()
    masked[to_mask] = 0
    donors = rng.integers(0, len(donor_features), size=int(to_random.sum()))
    masked[to_random] = donor_features[donors]
    return masked, selected.astype(np.float32)


# Object-masking actions, one per box, as the loader ships them (see draw_object_masks).
OBJECT_UNSELECTED = 0  # not a regression target; the input keeps the feature
OBJECT_ZEROED = 1  # selected; the input is the zero vector
OBJECT_REPLACED = 2  # selected; the input is the (unmasked) feature of a donor box
OBJECT_KEPT = 3  # selected; the input keeps the feature


def draw_object_masks(
    image_ids: Sequence[Hashable] | np.ndarray,
    num_boxes: int,
    rng: np.random.Generator,
    probability: float = MASK_PROBABILITY,
) -> tuple[np.ndarray, np.ndarray]:
    """The random part of object masking for one batch, without touching a feature.

    The loader ships these small arrays with the unmasked features, and
    :func:`apply_object_masks` applies them on the device: the host then builds and ships one
    float16 copy of the features instead of two float32 ones (targets and masked input).

    Every call makes the same four (B, O) draws from ``rng`` whatever the outcome, so the rest of
    the generator's stream never depends on how many boxes were picked.

    Args:
        image_ids: (B,) identity of the image in each row (any hashable or array values); rows
            with equal ids hold the same image.
        num_boxes: O, boxes per image.
        rng: the generator all draws come from.
        probability: selection rate per box.

    Returns:
        ``(actions, donors)``: ``actions`` (B, O) int8, one of ``OBJECT_UNSELECTED``,
        ``OBJECT_ZEROED`` (80% of the selected), ``OBJECT_REPLACED`` (10%) and ``OBJECT_KEPT``
        (10%); ``donors`` (B, O) int64, the flat index ``row * O + box`` of the box whose unmasked
        feature a replaced box takes, and the box's own index everywhere else (so applying the
        draws is a plain gather, with no data-dependent shape). A donor box is drawn uniformly
        from the rows that hold a *different* image; when no row does (every row holds the same
        image: a batch of one example, or the end of a validation stream), it is drawn uniformly
        from all boxes of the batch, i.e. from the image itself, as the previous host-side
        masking did.
    """
    codes = np.unique(np.asarray(image_ids), return_inverse=True)[1].reshape(-1)
    size = len(codes)
    selected = rng.random((size, num_boxes)) < probability
    to_zero, to_replace = _split_selected(selected, rng)
    row_draw = rng.random((size, num_boxes))
    box_draw = rng.integers(0, num_boxes, size=(size, num_boxes))

    actions = np.where(selected, OBJECT_KEPT, OBJECT_UNSELECTED).astype(np.int8)
    actions[to_zero] = OBJECT_ZEROED
    actions[to_replace] = OBJECT_REPLACED
    donors = np.arange(size * num_boxes, dtype=np.int64).reshape(size, num_boxes)
    rows, boxes = np.nonzero(to_replace)
    if len(rows):
        # Candidate donor rows per row: those with another image, or every row if there is none.
        candidates = codes[:, None] != codes[None, :]
        candidates |= ~candidates.any(axis=1, keepdims=True)
        counts = candidates.sum(axis=1)
        # The k-th candidate of a row, k uniform in [0, count): the first column whose running
        # count of candidates exceeds k.
        k = np.minimum((row_draw[rows, boxes] * counts[rows]).astype(np.int64), counts[rows] - 1)
        donor_rows = (np.cumsum(candidates, axis=1)[rows] <= k[:, None]).sum(axis=1)
        donors[rows, boxes] = donor_rows * num_boxes + box_draw[rows, boxes]
    return actions, donors


def apply_object_masks(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a shipped batch (unmasked float16 features + masking draws) into the objectives' keys.

    Replaces ``UNMASKED_FEATURES``, ``OBJECT_MASK_ACTIONS`` and ``OBJECT_MASK_DONORS`` (see
    :mod:`lxtrain.batch`) by ``OBJECT_FEATURES`` (float32, masked: zeroed, replaced by the donor
    box or kept as :func:`draw_object_masks` drew them), ``FEATURE_TARGETS`` (float32, unmasked)
    and ``OBJECT_MASK`` (float32, 1 at every selected box); other entries pass through. A batch
    without the draws (already applied, or built by hand) is returned as a new dict, unchanged.

    Runs on whatever device the tensors are on, with static shapes and without reading anything
    back to the host (a gather and two selects), so it queues behind the copy without a sync and
    can sit inside a compiled or graph-captured step.
    """
    out = {key: value for key, value in batch.items() if key not in B.OBJECT_MASKING_DRAW_KEYS}
    if B.UNMASKED_FEATURES not in batch:
        return out
    features = batch[B.UNMASKED_FEATURES]
    actions = batch[B.OBJECT_MASK_ACTIONS]
    donors = batch[B.OBJECT_MASK_DONORS]
    size, boxes, dim = features.shape
    # Gather and select in float16 (half the bytes), then upcast: selections are exact in any dtype.
    donated = features.reshape(size * boxes, dim).index_select(0, donors.reshape(-1)).view(size, boxes, dim)
    masked = torch.where((actions == OBJECT_REPLACED).unsqueeze(-1), donated, features)
    masked = masked.masked_fill((actions == OBJECT_ZEROED).unsqueeze(-1), 0.0)
    out[B.OBJECT_FEATURES] = masked.float()
    out[B.FEATURE_TARGETS] = features.float()
    out[B.OBJECT_MASK] = (actions != OBJECT_UNSELECTED).float()
    return out
