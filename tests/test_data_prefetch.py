"""The device prefetcher: today's batch keys on the device, equal to to_device; CPU here, CUDA if present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lxtrain import batch as B
from lxtrain.data.collate import IMAGE_IDS
from lxtrain.data.loader import build_pretrain_loader
from lxtrain.data.prefetch import DevicePrefetcher
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate

WORLD = World(feature_dim=32, boxes=10, max_objects=4)
OBJECTIVE_KEYS = {
    B.INPUT_IDS,
    B.ATTENTION_MASK,
    B.TOKEN_TYPE_IDS,
    B.OBJECT_FEATURES,
    B.OBJECT_BOXES,
    B.MLM_LABELS,
    B.FEATURE_TARGETS,
    B.OBJECT_MASK,
    B.OBJECT_LABELS,
    B.OBJECT_CONFIDENCES,
    B.ATTRIBUTE_LABELS,
    B.ATTRIBUTE_CONFIDENCES,
    B.MATCHED_LABELS,
    B.QA_LABELS,
    B.SENTENCE_SOURCES,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefetch")
    generate(SyntheticConfig(out=out, images=120, valid_images=1, world=WORLD, shards=True, shard_size=40))
    return out / "shards" / "train"


def _loader(shards: Path, **options):
    settings = dict(batch_size=8, seed=5, num_workers=2, buffer_images=32, in_process=True)
    return build_pretrain_loader(shards, **(settings | options))


def _assert_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key].cpu(), right[key].cpu()), key


def test_prefetcher_on_cpu_gives_the_objectives_keys_like_to_device(shards: Path) -> None:
    loader = _loader(shards)
    expected = [B.to_device(batch, torch.device("cpu")) for batch in _loader(shards)]
    prefetcher = DevicePrefetcher(loader, "cpu")
    assert len(prefetcher) == len(loader) == len(expected) > 5
    got = list(prefetcher)
    assert len(got) == len(expected)
    for batch, reference in zip(got, expected, strict=True):
        assert set(batch) == OBJECTIVE_KEYS
        assert batch[B.OBJECT_FEATURES].dtype == batch[B.FEATURE_TARGETS].dtype == torch.float32
        _assert_equal(batch, reference)
    # The object masking really happened: some selected boxes differ from their targets.
    batch = got[0]
    selected = batch[B.OBJECT_MASK].bool()
    assert selected.any() and not torch.equal(batch[B.OBJECT_FEATURES], batch[B.FEATURE_TARGETS])
    assert torch.equal(batch[B.OBJECT_FEATURES][~selected], batch[B.FEATURE_TARGETS][~selected])


def test_prefetcher_keeps_non_tensor_entries_and_hand_built_batches() -> None:
    batches = [
        {B.QA_LABELS: torch.tensor([1, 2]), "question_ids": ["q1", "q2"]},
        {B.QA_LABELS: torch.tensor([3]), "question_ids": ["q3"]},
    ]
    got = list(DevicePrefetcher(batches, torch.device("cpu")))
    assert [b["question_ids"] for b in got] == [["q1", "q2"], ["q3"]]
    assert [b[B.QA_LABELS].tolist() for b in got] == [[1, 2], [3]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pin_memory", [False, True])
def test_prefetcher_on_cuda_equals_the_cpu_batches(shards: Path, pin_memory: bool) -> None:
    expected = [B.to_device(batch, torch.device("cpu")) for batch in _loader(shards, with_ids=True)]
    loader = _loader(shards, with_ids=True, in_process=False, pin_memory=pin_memory)
    count = 0
    for batch, reference in zip(DevicePrefetcher(loader, "cuda"), expected, strict=True):
        assert batch[B.OBJECT_FEATURES].is_cuda and batch[IMAGE_IDS].is_cuda
        # Work on the compute stream after the hand-over sees the copied values.
        _assert_equal(batch, reference)
        count += 1
    assert count == len(expected)
