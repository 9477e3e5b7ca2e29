"""Word and object masking: rates, the 80/10/10 split and untouched special tokens, over many draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lxtrain import batch as B
from lxtrain.tasks.masking import (
    IGNORE_INDEX,
    MASK_PROBABILITY,
    OBJECT_KEPT,
    OBJECT_REPLACED,
    OBJECT_UNSELECTED,
    OBJECT_ZEROED,
    apply_object_masks,
    draw_object_masks,
    mask_objects,
    mask_words,
)

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


# ---------------------------------------------------------------------------------------------
# Objects, the loader's split: draws on the host, applied with torch on the device.


def _reference_apply(features: np.ndarray, actions: np.ndarray, donors: np.ndarray) -> np.ndarray:
    """Object masking box by box, written plainly from the documented meaning of the draws."""
    size, boxes, _ = features.shape
    masked = features.astype(np.float32)
    for row in range(size):
        for box in range(boxes):
            if actions[row, box] == OBJECT_ZEROED:
                masked[row, box] = 0.0
            elif actions[row, box] == OBJECT_REPLACED:
                donor_row, donor_box = divmod(int(donors[row, box]), boxes)
                masked[row, box] = features[donor_row, donor_box]
    return masked


def _shipped(features: np.ndarray, actions: np.ndarray, donors: np.ndarray, **extra) -> dict:
    return {
        B.UNMASKED_FEATURES: torch.from_numpy(features.astype(np.float16)),
        B.OBJECT_MASK_ACTIONS: torch.from_numpy(actions.astype(np.int8)),
        B.OBJECT_MASK_DONORS: torch.from_numpy(donors.astype(np.int64)),
        **extra,
    }


def test_apply_object_masks_equals_the_reference_on_a_hand_made_batch() -> None:
    # 3 rows x 4 boxes x 2 dims; the values are exact in float16, every box distinct.
    features = (np.arange(24, dtype=np.float32).reshape(3, 4, 2) + 1) / 4
    actions = np.array(
        [
            [OBJECT_UNSELECTED, OBJECT_ZEROED, OBJECT_REPLACED, OBJECT_KEPT],
            [OBJECT_REPLACED, OBJECT_UNSELECTED, OBJECT_UNSELECTED, OBJECT_ZEROED],
            [OBJECT_KEPT, OBJECT_REPLACED, OBJECT_UNSELECTED, OBJECT_UNSELECTED],
        ]
    )
    donors = np.arange(12).reshape(3, 4)
    donors[0, 2] = 1 * 4 + 3  # row 0 box 2 takes row 1 box 3 (itself zeroed: the donor is unmasked)
    donors[1, 0] = 2 * 4 + 0
    donors[2, 1] = 0 * 4 + 1
    labels = torch.arange(3)
    out = apply_object_masks(
        _shipped(features, actions, donors, **{B.QA_LABELS: labels, "ids": ["a", "b", "c"]})
    )

    assert set(out) == {B.OBJECT_FEATURES, B.FEATURE_TARGETS, B.OBJECT_MASK, B.QA_LABELS, "ids"}
    assert out[B.QA_LABELS] is labels and out["ids"] == ["a", "b", "c"]
    expected = _reference_apply(features, actions, donors)
    assert out[B.OBJECT_FEATURES].dtype == torch.float32
    np.testing.assert_array_equal(out[B.OBJECT_FEATURES].numpy(), expected)
    # Spelled out for three boxes, so the reference cannot share a bug with the function.
    np.testing.assert_array_equal(out[B.OBJECT_FEATURES][0, 2].numpy(), features[1, 3])
    np.testing.assert_array_equal(out[B.OBJECT_FEATURES][0, 1].numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(out[B.OBJECT_FEATURES][2, 0].numpy(), features[2, 0])
    assert out[B.FEATURE_TARGETS].dtype == torch.float32
    np.testing.assert_array_equal(out[B.FEATURE_TARGETS].numpy(), features)
    np.testing.assert_array_equal(
        out[B.OBJECT_MASK].numpy(), (actions != OBJECT_UNSELECTED).astype(np.float32)
    )
    # Applying again (a batch that no longer carries the draws) changes nothing.
    again = apply_object_masks(out)
    assert again is not out and all(again[key] is out[key] for key in out)


class _HostReads(TorchDispatchMode):
    """Counts the aten ops that read a device value back to the host (a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "nonzero_static", "is_nonzero", "item"):
            self.reads.append(name)
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.reads.append(f"{name} with a boolean index")
        return func(*args, **kwargs)


def test_apply_object_masks_reads_nothing_back_to_the_host() -> None:
    rng = np.random.default_rng(3)
    features = rng.random((8, 36, 16)).astype(np.float16).astype(np.float32)  # as shipped
    actions, donors = draw_object_masks(np.arange(8) // 2, 36, rng, probability=0.5)
    batch = _shipped(features, actions, donors)
    with _HostReads() as mode:
        out = apply_object_masks(batch)
    assert mode.reads == [] and mode.ops > 3  # the mode did see the ops
    np.testing.assert_array_equal(out[B.OBJECT_FEATURES].numpy(), _reference_apply(features, actions, donors))
    # The counter does catch what it looks for (a guard against a mode that sees nothing).
    with _HostReads() as mode:
        chosen = out[B.OBJECT_FEATURES][out[B.OBJECT_MASK].bool()]
        float(chosen.sum())
    assert "_local_scalar_dense" in mode.reads and any("boolean" in read for read in mode.reads)


def test_object_draws_rates_split_and_donors_from_other_images() -> None:
    rng = np.random.default_rng(20)
    image_ids = np.array([f"img{i // 3}" for i in range(60)])  # 20 images, 3 sentences each
    actions, donors = [], []
    for _ in range(40):
        a, d = draw_object_masks(image_ids, 36, rng)
        actions.append(a)
        donors.append(d)
    actions, donors = np.stack(actions), np.stack(donors)  # (draws, B, O)
    assert actions.dtype == np.int8 and donors.dtype == np.int64 and actions.shape == (40, 60, 36)
    selected = actions != OBJECT_UNSELECTED
    _assert_rate("box selection", int(selected.sum()), selected.size, MASK_PROBABILITY)
    n = int(selected.sum())
    _assert_rate("zeroed share", int((actions == OBJECT_ZEROED).sum()), n, 0.8)
    _assert_rate("replaced share", int((actions == OBJECT_REPLACED).sum()), n, 0.1)
    _assert_rate("kept share", int((actions == OBJECT_KEPT).sum()), n, 0.1)
    own = np.arange(60 * 36).reshape(60, 36)
    replaced = actions == OBJECT_REPLACED
    assert (donors[~replaced] == np.broadcast_to(own, donors.shape)[~replaced]).all()
    rows = np.broadcast_to(np.arange(60)[:, None], donors.shape)
    donor_rows, donor_boxes = np.divmod(donors[replaced], 36)
    assert (image_ids[donor_rows] != image_ids[rows[replaced]]).all(), "a donor box from the same image"
    # Donors spread over every other row and every box.
    assert len(np.unique(donor_rows)) == 60 and len(np.unique(donor_boxes)) == 36


def test_object_draws_without_another_image_use_the_batch_itself() -> None:
    actions, donors = draw_object_masks(["only"] * 3, 36, np.random.default_rng(1), probability=1.0)
    replaced = actions == OBJECT_REPLACED
    assert replaced.sum() > 0
    assert ((donors >= 0) & (donors < 3 * 36)).all()
    assert len(np.unique(donors[replaced] // 36)) > 1  # drawn over all rows, not only the own row


def test_object_draws_are_a_pure_function_of_the_generator_and_a_fixed_number_of_draws() -> None:
    ids = np.arange(16) % 5
    first = draw_object_masks(ids, 36, np.random.default_rng(4))
    second = draw_object_masks(ids, 36, np.random.default_rng(4))
    other = draw_object_masks(ids, 36, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], other[0])
    # The generator ends in the same state whatever was selected: later draws of a batch
    # (and so resume) do not depend on the masking outcome.
    after = []
    for probability in (0.0, 0.15, 1.0):
        rng = np.random.default_rng(6)
        draw_object_masks(ids, 36, rng, probability=probability)
        after.append(rng.random())
    assert after[0] == after[1] == after[2]
