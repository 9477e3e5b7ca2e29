"""The collated pre-training batch: the one contract between the loader and the objectives.

A batch is a ``dict[str, torch.Tensor]`` with these keys (B examples, T tokens, O objects,
D feature dimension). The loader produces it; ``lxtrain.tasks.objectives`` consumes it.

The loader ships object masking unapplied: instead of ``OBJECT_FEATURES``, ``FEATURE_TARGETS``
and ``OBJECT_MASK`` (two float32 copies of the features), a host batch carries
``UNMASKED_FEATURES`` (one float16 copy, as stored in the shards) and the per-batch masking draws
``OBJECT_MASK_ACTIONS`` / ``OBJECT_MASK_DONORS`` (~4x fewer bytes per batch).
:func:`lxtrain.tasks.masking.apply_object_masks` turns them into the three keys on the training
device; :func:`to_device` and :class:`lxtrain.data.prefetch.DevicePrefetcher` call it, so code
after either sees the keys below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Model inputs.
INPUT_IDS = "input_ids"  # (B, T) int64, word-pieces after word masking
ATTENTION_MASK = "attention_mask"  # (B, T) int64, 1 for real tokens, 0 for padding
TOKEN_TYPE_IDS = "token_type_ids"  # (B, T) int64, all 0 (single segment)
OBJECT_FEATURES = "object_features"  # (B, O, D) float32, RoI features after object masking
OBJECT_BOXES = "object_boxes"  # (B, O, 4) float32, (x1/w, y1/h, x2/w, y2/h) in [0, 1]

# Targets.
MLM_LABELS = "mlm_labels"  # (B, T) int64, original id at masked positions, IGNORE_INDEX elsewhere
FEATURE_TARGETS = "object_feature_targets"  # (B, O, D) float32, features before masking
OBJECT_MASK = "object_mask"  # (B, O) float32, 1 at masked boxes (feature-regression targets)
OBJECT_LABELS = "object_labels"  # (B, O) int64, detector class id
OBJECT_CONFIDENCES = "object_confidences"  # (B, O) float32, detector class confidence
ATTRIBUTE_LABELS = "attribute_labels"  # (B, O) int64, detector attribute id
ATTRIBUTE_CONFIDENCES = "attribute_confidences"  # (B, O) float32
MATCHED_LABELS = "matched_labels"  # (B,) int64, 1 if the sentence describes the image, else 0
QA_LABELS = "qa_labels"  # (B,) int64, answer id, IGNORE_INDEX where no QA target
SENTENCE_SOURCES = "sentence_sources"  # (B,) int64, index into SENTENCE_SOURCE_NAMES

# What the loader ships instead of OBJECT_FEATURES, FEATURE_TARGETS and OBJECT_MASK.
UNMASKED_FEATURES = "unmasked_object_features"  # (B, O, D) float16, RoI features as stored
OBJECT_MASK_ACTIONS = "object_mask_actions"  # (B, O) int8, lxtrain.tasks.masking.OBJECT_* codes
OBJECT_MASK_DONORS = "object_mask_donors"  # (B, O) int64, flat row * O + box index of the donor box
OBJECT_MASKING_DRAW_KEYS = (UNMASKED_FEATURES, OBJECT_MASK_ACTIONS, OBJECT_MASK_DONORS)

SENTENCE_SOURCE_NAMES = ("mscoco", "vg", "vqa", "gqa", "visual7w")
"""Sentence sources of the published pre-training JSON; captions first, then QA sources."""

QA_SOURCE_NAMES = ("vqa", "gqa", "visual7w")

MODEL_INPUT_KEYS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, OBJECT_FEATURES, OBJECT_BOXES)


def move(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Copy a batch's tensors to ``device`` as they are (non-tensor entries, e.g. ids, stay)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (non-tensor entries, e.g. ids for submissions, stay)
    and, if it carries the loader's object-masking draws, apply them there (see the module
    docstring), so the result always has the keys the objectives read."""
    from lxtrain.tasks.masking import apply_object_masks  # masking imports this module's keys

    return apply_object_masks(move(batch, device))
