"""Word and object masking for the pre-training tasks (SPEC 3).

Pure functions of their inputs and an explicit ``numpy.random.Generator``: they run inside
data-loader workers, so the same (seed, epoch, rank, worker) always gives the same masks, and
nothing here touches global random state.

Both functions work on whole batches (any leading shape) because per-example Python loops are
the slowest part of a loader: one vectorised draw per batch keeps masking off the critical path.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

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
