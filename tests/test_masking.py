"""Word and object masking: rates, the 80/10/10 split and untouched special tokens, over many draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lxtrain.tasks.masking import IGNORE_INDEX, MASK_PROBABILITY, mask_objects, mask_words

CLS, SEP, PAD, MASK = 101, 102, 0, 103
VOCAB = 30522
SIGMAS = 5.0  # a correct implementation fails a 5-sigma check about once in 1.7 million runs


def _assert_rate(name: str, hits: int, trials: int, probability: float) -> None:
    """The observed share is within SIGMAS binomial standard deviations of ``probability``."""
    assert trials > 0, name
    std = math.sqrt(probability * (1 - probability) / trials)
    share = hits / trials
    assert abs(share - probability) <= SIGMAS * std, (
        f"{name}: observed {share:.4f} over {trials} draws, expected {probability} +- {SIGMAS * std:.4f}"
    )


def _sentences(rows: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """[CLS] words [SEP] [PAD]..., varied lengths; words avoid the special ids."""
    ids = np.full((rows, length), PAD, dtype=np.int64)
    lengths = rng.integers(3, length + 1, size=rows)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = CLS, SEP
        ids[row, 1 : n - 1] = rng.integers(1000, VOCAB, size=n - 2)
    return ids


def _mask_words(ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return mask_words(
        ids,
        np.random.default_rng(seed),
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=(CLS, SEP, PAD),
    )


@pytest.fixture(scope="module")
def word_draw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = _sentences(4000, 20, np.random.default_rng(0))
    masked, labels = _mask_words(ids, seed=1)
    return ids, masked, labels


def test_word_selection_rate_and_labels(word_draw) -> None:
    ids, masked, labels = word_draw
    eligible = ~np.isin(ids, (CLS, SEP, PAD))
    selected = labels != IGNORE_INDEX
    _assert_rate("selection", int(selected.sum()), int(eligible.sum()), MASK_PROBABILITY)
    # Labels: the original id exactly at selected positions, IGNORE_INDEX everywhere else.
    assert np.array_equal(labels[selected], ids[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    assert labels.dtype == np.int64 and labels.shape == ids.shape
    # Unselected positions are never changed.
    assert np.array_equal(masked[~selected], ids[~selected])


def test_word_80_10_10_split(word_draw) -> None:
    ids, masked, labels = word_draw
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    became_mask = int((masked[selected] == MASK).sum())
    unchanged = int((masked[selected] == ids[selected]).sum())
    randomised = n - became_mask - unchanged
    # A random replacement equals [MASK] or the original with probability 1/VOCAB each: far below
    # the tolerance, so the three observed shares estimate 80/10/10 directly.
    _assert_rate("[MASK] share", became_mask, n, 0.8)
    _assert_rate("random share", randomised, n, 0.1)
    _assert_rate("unchanged share", unchanged, n, 0.1)
    replacements = masked[selected & (masked != MASK) & (masked != ids)]
    assert replacements.min() >= 0 and replacements.max() < VOCAB
    # Random ids spread over the vocabulary, not a constant or a narrow range.
    assert len(np.unique(replacements)) > 0.9 * len(replacements)


def test_special_tokens_never_selected_or_changed(word_draw) -> None:
    ids, masked, labels = word_draw
    special = np.isin(ids, (CLS, SEP, PAD))
    assert special.sum() > 10000
    assert (labels[special] == IGNORE_INDEX).all()
    assert np.array_equal(masked[special], ids[special])


def test_word_masking_is_a_pure_function_of_the_generator() -> None:
    ids = _sentences(64, 20, np.random.default_rng(3))
    original = ids.copy()
    first, second, other = _mask_words(ids, 7), _mask_words(ids, 7), _mask_words(ids, 8)
    assert np.array_equal(ids, original), "the input must not be modified"
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_word_masking_probability_argument() -> None:
    ids = _sentences(2000, 20, np.random.default_rng(4))
    _, labels = mask_words(
        ids,
        np.random.default_rng(5),
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=(CLS, SEP, PAD),
        probability=0.4,
    )
    eligible = ~np.isin(ids, (CLS, SEP, PAD))
    _assert_rate("selection at p=0.4", int((labels != IGNORE_INDEX).sum()), int(eligible.sum()), 0.4)


def test_object_words_masked_at_their_own_rate() -> None:
    rng = np.random.default_rng(6)
    ids = _sentences(3000, 20, rng)
    object_words = np.array([1500, 1501, 1502])
    words = ~np.isin(ids, (CLS, SEP, PAD))
    ids[words & (rng.random(ids.shape) < 0.2)] = rng.choice(object_words, size=1)[0]
    options = dict(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(CLS, SEP, PAD))
    masked, labels = mask_words(
        ids, np.random.default_rng(7), object_word_ids=object_words, object_word_probability=0.9, **options
    )
    is_object_word = np.isin(ids, object_words)
    others = words & ~is_object_word
    selected = labels != IGNORE_INDEX
    _assert_rate("object words at 0.9", int(selected[is_object_word].sum()), int(is_object_word.sum()), 0.9)
    _assert_rate("other words at 0.15", int(selected[others].sum()), int(others.sum()), MASK_PROBABILITY)
    assert np.array_equal(labels[selected], ids[selected])
    _assert_rate("[MASK] share", int((masked[selected] == MASK).sum()), int(selected.sum()), 0.8)
    # Without the rate, the list changes nothing: the same draws as LXMERT's uniform masking.
    plain = mask_words(ids, np.random.default_rng(7), **options)
    listed = mask_words(ids, np.random.default_rng(7), object_word_ids=object_words, **options)
    assert all(np.array_equal(a, b) for a, b in zip(plain, listed, strict=True))
    # And the word rate given as the object-word rate is LXMERT's masking exactly.
    same_rate = mask_words(
        ids,
        np.random.default_rng(7),
        object_word_ids=object_words,
        object_word_probability=MASK_PROBABILITY,
        **options,
    )
    assert all(np.array_equal(a, b) for a, b in zip(plain, same_rate, strict=True))


# ---------------------------------------------------------------------------------------------
# Objects.


@pytest.fixture(scope="module")
def object_draw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10)
    features = rng.uniform(0.5, 2.0, size=(3000, 36, 8)).astype(np.float32)  # never zero
    donors = -rng.uniform(0.5, 2.0, size=(50, 8)).astype(np.float32)  # negative: never an original
    masked, selected = mask_objects(features, np.random.default_rng(11), donor_features=donors)
    return features, donors, masked, selected


def test_object_selection_rate_and_mask(object_draw) -> None:
    features, _, masked, selected = object_draw
    assert selected.dtype == np.float32 and selected.shape == features.shape[:-1]
    assert set(np.unique(selected)) <= {0.0, 1.0}
    chosen = selected == 1
    _assert_rate("box selection", int(chosen.sum()), chosen.size, MASK_PROBABILITY)
    assert np.array_equal(masked[~chosen], features[~chosen]), "unselected boxes must be unchanged"


def test_object_zero_donor_unchanged_split(object_draw) -> None:
    features, donors, masked, selected = object_draw
    rows = masked[selected == 1]  # (N, D)
    originals = features[selected == 1]
    n = len(rows)
    zeroed = (rows == 0).all(-1)
    unchanged = (rows == originals).all(-1)
    # A donor row equals one row of the donor array exactly (bit for bit).
    matches = (rows[:, None, :] == donors[None, :, :]).all(-1)  # (N, num_donors)
    from_donor = matches.any(-1)
    assert not (zeroed & from_donor).any() and not (unchanged & from_donor).any()
    assert (zeroed | unchanged | from_donor).all(), "every selected box is zeroed, donated or kept"
    _assert_rate("zeroed share", int(zeroed.sum()), n, 0.8)
    _assert_rate("donor share", int(from_donor.sum()), n, 0.1)
    _assert_rate("unchanged share", int(unchanged.sum()), n, 0.1)
    # Donors are drawn across the whole donor array.
    assert len(np.unique(matches[from_donor].argmax(-1))) == len(donors)


def test_object_masking_is_deterministic_and_checks_donors() -> None:
    features = np.random.default_rng(0).random((16, 36, 8)).astype(np.float32)
    donors = np.ones((4, 8), dtype=np.float32)
    first = mask_objects(features, np.random.default_rng(1), donor_features=donors)
    second = mask_objects(features, np.random.default_rng(1), donor_features=donors)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(ValueError, match=r"donor_features.*\(N>0, 8\).*\(4, 7\)"):
        mask_objects(features, np.random.default_rng(1), donor_features=np.ones((4, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="donor_features"):
        mask_objects(features, np.random.default_rng(1), donor_features=np.ones((0, 8), dtype=np.float32))
