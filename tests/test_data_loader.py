"""Streaming loader: coverage, rank disjointness, equal batch counts, determinism, resume,
image mixing, masking rates, validation, corrupt shards and missing inputs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain import batch as B
from lxtrain.data.collate import IMAGE_IDS, SENTENCE_IDS
from lxtrain.data.index import open_index
from lxtrain.data.loader import build_pretrain_loader, build_valid_loader
from lxtrain.data.problems import DataError
from lxtrain.data.tokenizer import VOCAB_ENV, WordPieceEncoder, default_vocab_path
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate
from lxtrain.tasks.masking import IGNORE_INDEX, OBJECT_REPLACED

WORLD = World(feature_dim=32, boxes=10, max_objects=4)
BATCH = 16
WORKERS = 2
RANKS = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """300 training images (~2,000 sentences) in 8 shards, 30 validation images."""
    out = tmp_path_factory.mktemp("corpus")
    generate(SyntheticConfig(out=out, images=300, valid_images=30, world=WORLD, shards=True, shard_size=40))
    return out / "shards"


def _loader(corpus: Path, rank: int = 0, **options):
    settings = dict(
        batch_size=BATCH,
        rank=rank,
        world_size=RANKS,
        seed=7,
        num_workers=WORKERS,
        buffer_images=64,
        with_ids=True,
        in_process=True,
    )
    settings.update(options)
    return build_pretrain_loader(corpus / "train", **settings)


def _epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def _masked(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The batches as the objectives see them: object masking applied (on the CPU here)."""
    return [B.to_device(batch, torch.device("cpu")) for batch in batches]


def _ids(batches: list[dict[str, torch.Tensor]], key: str = SENTENCE_IDS) -> np.ndarray:
    return np.concatenate([b[key].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def _assert_same(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_batches_have_the_contract_keys_shapes_and_dtypes(corpus: Path) -> None:
    loader = _loader(corpus, with_ids=False)
    shipped = next(iter(loader))
    common = {
        B.INPUT_IDS: ((BATCH, 20), torch.int64),
        B.ATTENTION_MASK: ((BATCH, 20), torch.int64),
        B.TOKEN_TYPE_IDS: ((BATCH, 20), torch.int64),
        B.OBJECT_BOXES: ((BATCH, WORLD.boxes, 4), torch.float32),
        B.MLM_LABELS: ((BATCH, 20), torch.int64),
        B.OBJECT_LABELS: ((BATCH, WORLD.boxes), torch.int64),
        B.OBJECT_CONFIDENCES: ((BATCH, WORLD.boxes), torch.float32),
        B.ATTRIBUTE_LABELS: ((BATCH, WORLD.boxes), torch.int64),
        B.ATTRIBUTE_CONFIDENCES: ((BATCH, WORLD.boxes), torch.float32),
        B.MATCHED_LABELS: ((BATCH,), torch.int64),
        B.QA_LABELS: ((BATCH,), torch.int64),
        B.SENTENCE_SOURCES: ((BATCH,), torch.int64),
    }
    # What leaves the loader: the features once, unmasked, in float16, and the masking draws.
    expected_shipped = common | {
        B.UNMASKED_FEATURES: ((BATCH, WORLD.boxes, WORLD.feature_dim), torch.float16),
        B.OBJECT_MASK_ACTIONS: ((BATCH, WORLD.boxes), torch.int8),
        B.OBJECT_MASK_DONORS: ((BATCH, WORLD.boxes), torch.int64),
    }
    assert set(shipped) == set(expected_shipped)
    for key, (shape, dtype) in expected_shipped.items():
        assert tuple(shipped[key].shape) == shape and shipped[key].dtype == dtype, key
    # What the objectives read, after to_device (or the device prefetcher) applied the masks.
    batch = B.to_device(shipped, torch.device("cpu"))
    expected = common | {
        B.OBJECT_FEATURES: ((BATCH, WORLD.boxes, WORLD.feature_dim), torch.float32),
        B.FEATURE_TARGETS: ((BATCH, WORLD.boxes, WORLD.feature_dim), torch.float32),
        B.OBJECT_MASK: ((BATCH, WORLD.boxes), torch.float32),
    }
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    boxes = batch[B.OBJECT_BOXES]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert (batch[B.TOKEN_TYPE_IDS] == 0).all()
    assert (batch[B.INPUT_IDS][:, 0] == 101).all()


def test_two_ranks_two_workers_cover_every_sentence_once(corpus: Path) -> None:
    total = open_index(corpus / "train").sentences
    per_rank = []
    for rank in range(RANKS):
        loader = _loader(corpus, rank)
        batches = _epoch(loader)
        assert len(batches) == len(loader) > 0
        assert all(len(b[SENTENCE_IDS]) == BATCH for b in batches)
        per_rank.append(_ids(batches))
    # Equal batch counts on every rank, and no sentence twice within or across ranks.
    assert len(per_rank[0]) == len(per_rank[1])
    seen = np.concatenate(per_rank)
    assert len(np.unique(seen)) == len(seen)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert seen.min() >= 0 and seen.max() < total
    # Only the documented tail is missing: fewer than batch_size + 1 sentences per virtual stream
    # (RANKS micro-batches per step x the default interleave of 2 streams).
    streams = RANKS * 2
    assert total - len(seen) == total - streams * ((total // streams) // BATCH) * BATCH
    assert total - len(seen) < streams * (BATCH + 1)


def test_deterministic_per_seed_and_different_per_seed(corpus: Path) -> None:
    first, second = _epoch(_loader(corpus)), _epoch(_loader(corpus))
    _assert_same(first, second)
    other = _epoch(_loader(corpus, seed=8))
    assert not np.array_equal(_ids(first), _ids(other))


def test_each_epoch_has_a_different_order_and_full_coverage(corpus: Path) -> None:
    loader = _loader(corpus)
    epoch0 = _ids(_epoch(loader))
    assert loader.epoch == 1
    epoch1 = _ids(_epoch(loader))
    assert len(epoch0) == len(epoch1)
    assert not np.array_equal(epoch0, epoch1)
    assert len(np.unique(epoch1)) == len(epoch1)
    # A different shard order and shuffle: the dropped tails differ too.
    assert set(epoch0) != set(epoch1)


@pytest.mark.parametrize("stop", [1, 2, 5, 12])
def test_mid_epoch_resume_equals_uninterrupted_run(corpus: Path, stop: int) -> None:
    reference = _epoch(_loader(corpus, rank=1, epoch=1))
    first = _loader(corpus, rank=1, epoch=1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop:
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == stop
    resumed = _loader(corpus, rank=1)
    resumed.load_state_dict(state)
    tail = _epoch(resumed)
    _assert_same(head + tail, reference)
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches_consumed"] == 0


def test_resume_accepts_another_world_size_but_not_another_global_batch(corpus: Path) -> None:
    # The order depends on the global batch (world_size x accumulation micro-batches per step),
    # not on how it is split: 1 rank accumulating 2 continues 2 ranks' position; 1 rank alone
    # would be half the global batch, and is refused (tests/test_data_streams.py has the rest).
    state = _loader(corpus).state_dict()
    settings = dict(batch_size=BATCH, rank=0, world_size=1, seed=7, num_workers=WORKERS, buffer_images=64)
    build_pretrain_loader(corpus / "train", accumulation=2, **settings).load_state_dict(state)
    with pytest.raises(ValueError, match="micro_batches_per_step was 2, is 1"):
        build_pretrain_loader(corpus / "train", **settings).load_state_dict(state)


@pytest.mark.multiproc
def test_worker_processes_match_in_process_order_and_resume(corpus: Path) -> None:
    reference = _epoch(_loader(corpus))
    processes = _epoch(_loader(corpus, in_process=False))
    _assert_same(processes, reference)
    loader = _loader(corpus, in_process=False)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    resumed = _loader(corpus, in_process=False)
    resumed.load_state_dict(loader.state_dict())
    _assert_same(head + _epoch(resumed), reference)


@pytest.mark.multiproc
def test_shared_buffer_ring_gives_the_same_batches(corpus: Path) -> None:
    reference = _epoch(_loader(corpus))
    # The ring reuses a batch's feature memory a few batches later: keep copies, as documented.
    copies = [
        {k: v.clone() for k, v in b.items()} for b in _loader(corpus, in_process=False, shared_buffers=True)
    ]
    _assert_same(copies, reference)
    assert reference[0][B.UNMASKED_FEATURES].shape[0] == BATCH


def test_batches_mix_images(tmp_path: Path) -> None:
    """Distinct-image share at batch 256 with the default buffer (1,024 images)."""
    generate(
        SyntheticConfig(
            out=tmp_path,
            images=2600,
            valid_images=1,
            world=World(feature_dim=8, boxes=4, max_objects=3),
            direct=True,
            shard_size=325,
            workers=2,
        )
    )
    loader = build_pretrain_loader(
        tmp_path / "shards" / "train", batch_size=256, num_workers=0, with_ids=True
    )
    shares = [len(np.unique(b[IMAGE_IDS].numpy())) / 256 for b in loader]
    share = float(np.mean(shares))
    print(
        f"distinct-image share per batch at 256: mean {share:.4f}, min {min(shares):.4f}, {len(shares)} batches"
    )
    assert share >= 0.95


def test_masking_rates_and_targets(corpus: Path) -> None:
    batches = _masked(_epoch(_loader(corpus, rank=0)) + _epoch(_loader(corpus, rank=1)))
    cat = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    ids, attention, labels = cat[B.INPUT_IDS], cat[B.ATTENTION_MASK], cat[B.MLM_LABELS]
    eligible = (attention == 1) & (labels != 101) & (labels != 102)
    eligible &= ~torch.isin(torch.where(labels == IGNORE_INDEX, ids, labels), torch.tensor([0, 101, 102]))
    selected = labels != IGNORE_INDEX
    assert not (selected & (attention == 0)).any()
    word_rate = selected.sum().item() / eligible.sum().item()
    assert 0.12 < word_rate < 0.18, word_rate
    masked_share = (ids[selected] == 103).float().mean().item()
    assert 0.7 < masked_share < 0.9, masked_share

    object_mask = cat[B.OBJECT_MASK].bool()
    assert 0.12 < object_mask.float().mean().item() < 0.18
    features, targets = cat[B.OBJECT_FEATURES], cat[B.FEATURE_TARGETS]
    assert torch.equal(features[~object_mask], targets[~object_mask])
    zeroed = (features[object_mask] == 0).all(-1).float().mean().item()
    assert 0.7 < zeroed < 0.9, zeroed

    matched = cat[B.MATCHED_LABELS]
    assert 0.4 < matched.float().mean().item() < 0.6
    qa = cat[B.QA_LABELS]
    assert (qa[matched == 0] == IGNORE_INDEX).all()
    answers = len(open_index(corpus / "train").answers)
    assert ((qa == IGNORE_INDEX) | ((qa >= 0) & (qa < answers))).all()
    assert (qa != IGNORE_INDEX).float().mean() > 0.15  # matched questions (about 60% of sentences)


def test_object_words_can_be_masked_at_their_own_rate(corpus: Path) -> None:
    object_words = tuple(int(i) for i in WordPieceEncoder().encode(["dog cat car bus"])[0][0, 1:5])
    batches = _epoch(_loader(corpus, object_word_ids=object_words, object_word_mask_probability=1.0))
    cat = {key: torch.cat([b[key] for b in batches]) for key in (B.INPUT_IDS, B.MLM_LABELS)}
    ids, labels = cat[B.INPUT_IDS], cat[B.MLM_LABELS]
    original = torch.where(labels == IGNORE_INDEX, ids, labels)
    is_object_word = torch.isin(original, torch.tensor(object_words))
    assert is_object_word.sum() > 100
    assert (labels[is_object_word] != IGNORE_INDEX).all()  # every one selected
    words = ~torch.isin(original, torch.tensor([0, 101, 102])) & ~is_object_word
    other_rate = (labels[words] != IGNORE_INDEX).float().mean().item()
    assert 0.12 < other_rate < 0.18, other_rate  # the rest still at the word rate
    with pytest.raises(ValueError, match="needs object_word_ids"):
        _loader(corpus, object_word_mask_probability=0.5)


def test_object_masking_donors_come_from_other_images(corpus: Path) -> None:
    replaced_boxes = 0
    for shipped in _epoch(_loader(corpus, object_mask_probability=1.0)):
        actions, donors = shipped[B.OBJECT_MASK_ACTIONS], shipped[B.OBJECT_MASK_DONORS]
        replaced = actions == OBJECT_REPLACED
        replaced_boxes += int(replaced.sum())
        rows = torch.arange(BATCH)[:, None].expand_as(donors)
        donor_rows, donor_boxes = donors // WORLD.boxes, donors % WORLD.boxes
        image_ids = shipped[IMAGE_IDS]
        assert (image_ids[donor_rows[replaced]] != image_ids[rows[replaced]]).all(), (
            "a donor from the same image"
        )
        # And the applied batch holds exactly the donor's unmasked feature there.
        batch = B.to_device(shipped, torch.device("cpu"))
        features, targets = batch[B.OBJECT_FEATURES], batch[B.FEATURE_TARGETS]
        assert torch.equal(features[replaced], targets[donor_rows[replaced], donor_boxes[replaced]])
        own = targets[rows[replaced]]  # (N, O, D): every box of the row's own image
        assert not (own == features[replaced][:, None, :]).all(-1).any(), "donor feature found in own image"
    assert replaced_boxes > 50


def test_validation_loader_is_deterministic_and_complete(corpus: Path) -> None:
    total = open_index(corpus / "valid").sentences
    seen = []
    for rank in range(RANKS):
        loader = build_valid_loader(
            corpus / "valid",
            batch_size=BATCH,
            rank=rank,
            world_size=RANKS,
            seed=3,
            num_workers=2,
            in_process=True,
            with_ids=True,
        )
        first, second = _epoch(loader), _epoch(loader)
        _assert_same(first, second)
        assert len(first) == len(loader)
        seen.append(_ids(first))
    everything = np.concatenate(seen)
    assert sorted(everything.tolist()) == list(range(total))


def test_corrupt_shard_is_skipped_with_warning_or_fatal_when_strict(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "train"
    shutil.copytree(corpus / "train", copy)
    victim = sorted(copy.glob("*.tar"))[2]
    data = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(data[: len(data) * 2 // 3]))
    settings = dict(batch_size=BATCH, rank=0, world_size=1, seed=7, num_workers=0, buffer_images=64)
    loader = build_pretrain_loader(copy, **settings)
    with caplog.at_level(logging.WARNING, logger="lxtrain.data"):
        batches = _epoch(loader)
    assert len(batches) == len(loader)  # the planned count is still met (no rank left waiting)
    assert loader.corrupt_samples > 0
    assert victim.name in caplog.text
    with pytest.raises(DataError, match=victim.name):
        _epoch(build_pretrain_loader(copy, strict=True, **settings))


def test_missing_inputs_fail_early_naming_them(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere-"):
        build_pretrain_loader(str(tmp_path / "nowhere-{000000..000003}.tar"), batch_size=4)
    (tmp_path / "lonely-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_pretrain_loader(str(tmp_path / "lonely-*.tar"), batch_size=4)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_pretrain_loader(corpus / "train", batch_size=4096)


def test_shard_pattern_selects_a_subset(corpus: Path) -> None:
    full = open_index(corpus / "train")
    subset = open_index(str(corpus / "train" / "train-00000[0-2].tar"))
    assert len(subset.shards) == 3
    assert subset.images == sum(s.images for s in full.shards[:3])


def test_fast_tokenizer_matches_the_rust_tokenizer(corpus: Path) -> None:
    encoder = WordPieceEncoder()
    texts = [
        "What color is the DOG?",
        "Hello, World! It's 3.14-ish; (really?) [yes] {no} ~tilde~ `q` a\x0bb \tc\nd\re \x7fz",
        "unaffable supercalifragilisticexpialidocious " + "x" * 120,
        "don't stop-believing #1 @home $5 %x ^y &z *w _u +v =t |s \\ / < > : \"",
        "",
        "a " * 40,
        "Café naïve 日本語",
    ]
    fast, _ = encoder.encode(texts)
    np.testing.assert_array_equal(fast, encoder.encode_reference(texts))


def test_word_piece_ids_are_the_pieces_of_each_word_without_special_tokens() -> None:
    encoder = WordPieceEncoder()
    dog, cat = (int(encoder.encode([word])[0][0, 1]) for word in ("dog", "cat"))
    assert encoder.word_piece_ids(["cat", "dog", "dog"]) == sorted({dog, cat})
    buses = encoder.encode(["buses"])[0][0]
    assert encoder.word_piece_ids(["buses"]) == sorted(int(i) for i in buses[1 : int((buses != 0).sum()) - 1])
    assert encoder.word_piece_ids([]) == []


def test_lxtrain_vocab_names_the_vocabulary_on_machines_without_the_package(tmp_path, monkeypatch) -> None:
    packaged = default_vocab_path()
    copy = tmp_path / "vocab.txt"
    shutil.copy(packaged, copy)
    monkeypatch.setenv(VOCAB_ENV, str(copy))
    assert default_vocab_path() == copy
    np.testing.assert_array_equal(
        WordPieceEncoder().encode(["a dog on a bus"])[0],
        WordPieceEncoder(packaged).encode(["a dog on a bus"])[0],
    )
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="LXTRAIN_VOCAB=.*missing.txt is not a file"):
        default_vocab_path()
