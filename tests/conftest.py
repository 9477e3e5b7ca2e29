"""Shared fixtures: a synthetic pre-training batch and an HF/lxtrain model pair with the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain import batch as B
from lxtrain import convert
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.masking import IGNORE_INDEX, mask_objects, mask_words

CLS, SEP, PAD, MASK = 101, 102, 0, 103
SPECIAL_IDS = (CLS, SEP, PAD)


def build_batch(
    config: LxmertConfig,
    *,
    batch_size: int = 4,
    seq_len: int = 12,
    num_objects: int = 6,
    seed: int = 0,
    qa_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """A collated batch (``lxtrain.batch`` keys) with padded sentences and masked words and boxes.

    Sentence lengths vary so the attention masks really pad; ``qa_rows`` (default: half of the
    rows) carry an answer, the rest are ignored.
    """
    rng = np.random.default_rng(seed)
    ids = np.full((batch_size, seq_len), PAD, dtype=np.int64)
    lengths = rng.integers(4, seq_len + 1, size=batch_size)
    lengths[0] = seq_len  # one full row, one short row: padding is always exercised
    lengths[-1] = min(lengths[-1], seq_len // 2)
    for row, length in enumerate(lengths):
        ids[row, 0] = CLS
        ids[row, 1 : length - 1] = rng.integers(1000, config.vocab_size, size=length - 2)
        ids[row, length - 1] = SEP
    masked_ids, mlm_labels = mask_words(
        ids,
        rng,
        mask_token_id=MASK,
        vocab_size=config.vocab_size,
        special_token_ids=SPECIAL_IDS,
        probability=0.3,
    )
    if (mlm_labels == IGNORE_INDEX).all():  # a batch with no masked word would test nothing
        mlm_labels[0, 1] = ids[0, 1]
        masked_ids[0, 1] = MASK

    dim = config.visual_feature_dim
    features = np.maximum(rng.normal(size=(batch_size, num_objects, dim)), 0).astype(np.float32)
    donors = np.maximum(rng.normal(size=(8, dim)), 0).astype(np.float32)
    masked_features, object_mask = mask_objects(features, rng, donor_features=donors, probability=0.3)
    object_mask[0, 0] = 1.0  # at least one regression target
    corners = np.sort(rng.random((batch_size, num_objects, 2, 2)), axis=2)  # x1 <= x2, y1 <= y2
    boxes = corners.transpose(0, 1, 3, 2).reshape(batch_size, num_objects, 4).astype(np.float32)

    qa_rows = batch_size // 2 if qa_rows is None else qa_rows
    qa_labels = np.full(batch_size, IGNORE_INDEX, dtype=np.int64)
    qa_labels[:qa_rows] = rng.integers(0, config.num_qa_labels, size=qa_rows)
    return {
        B.INPUT_IDS: torch.from_numpy(masked_ids),
        B.ATTENTION_MASK: torch.from_numpy((ids != PAD).astype(np.int64)),
        B.TOKEN_TYPE_IDS: torch.zeros(batch_size, seq_len, dtype=torch.long),
        B.OBJECT_FEATURES: torch.from_numpy(masked_features),
        B.OBJECT_BOXES: torch.from_numpy(boxes),
        B.MLM_LABELS: torch.from_numpy(mlm_labels),
        B.FEATURE_TARGETS: torch.from_numpy(features),
        B.OBJECT_MASK: torch.from_numpy(object_mask),
        B.OBJECT_LABELS: torch.from_numpy(
            rng.integers(0, config.num_object_labels, (batch_size, num_objects))
        ),
        B.OBJECT_CONFIDENCES: torch.from_numpy(rng.random((batch_size, num_objects)).astype(np.float32)),
        B.ATTRIBUTE_LABELS: torch.from_numpy(
            rng.integers(0, config.num_attribute_labels, (batch_size, num_objects))
        ),
        B.ATTRIBUTE_CONFIDENCES: torch.from_numpy(rng.random((batch_size, num_objects)).astype(np.float32)),
        B.MATCHED_LABELS: torch.from_numpy(rng.integers(0, 2, batch_size)),
        B.QA_LABELS: torch.from_numpy(qa_labels),
        B.SENTENCE_SOURCES: torch.from_numpy(rng.integers(0, len(B.SENTENCE_SOURCE_NAMES), batch_size)),
    }


def build_hf_pair(config: LxmertConfig, directory: Path, seed: int = 0):
    """A randomly initialised HF ``LxmertForPreTraining`` saved to ``directory`` and the lxtrain model
    loaded from that directory through the converter; both fp32 in eval mode."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LxmertForPreTraining(convert.hf_config(config)).eval()
    hf.save_pretrained(directory)
    model = convert.load_model("hf", directory).eval()
    return hf, model


def synthetic_task_shards(
    root: Path, images: int, sets: int, feature_dim: int
) -> tuple[Path, LxmertForPretraining]:
    """Fine-tuning task shards of a small synthetic world (``root/tasks/shards``) and a tiny
    pre-training model (seed 0) whose QA head covers the world's answers, for fine-tuning runs."""
    from lxtrain.synthetic import finetuning
    from lxtrain.synthetic.pretraining import World, all_answers

    world = World(feature_dim=feature_dim, boxes=8, max_objects=4)
    finetuning.generate(
        finetuning.TaskSetConfig(out=root / "tasks", images=images, sets=sets, world=world, shards=True)
    )
    torch.manual_seed(0)
    config = LxmertConfig.tiny(visual_feature_dim=feature_dim, num_qa_labels=len(all_answers()))
    return root / "tasks" / "shards", LxmertForPretraining(config)


@pytest.fixture
def tiny_config() -> LxmertConfig:
    return LxmertConfig.tiny()


@pytest.fixture
def tiny_model(tiny_config: LxmertConfig) -> LxmertForPretraining:
    torch.manual_seed(0)
    return LxmertForPretraining(tiny_config)


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    return build_batch


@pytest.fixture
def hf_pair(tmp_path: Path):
    """Factory: ``hf_pair(config) -> (hf_model, lxtrain_model, hf_directory)``."""

    def make(config: LxmertConfig, seed: int = 0):
        directory = tmp_path / f"hf-{seed}"
        hf, model = build_hf_pair(config, directory, seed)
        return hf, model, directory

    return make
