"""The collated pre-training batch: the one contract between the loader and the objectives.

A batch is a ``dict[str, torch.Tensor]`` with these keys (B examples, T tokens, O objects,
D feature dimension). The loader produces it; ``lxtrain.tasks.objectives`` consumes it.
"""

from __future__ import annotations

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

SENTENCE_SOURCE_NAMES = ("mscoco", "vg", "vqa", "gqa", "visual7w")
"""Sentence sources of the published pre-training JSON; captions first, then QA sources."""

QA_SOURCE_NAMES = ("vqa", "gqa", "visual7w")

MODEL_INPUT_KEYS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, OBJECT_FEATURES, OBJECT_BOXES)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors to ``device`` (non-tensor entries, e.g. ids for submissions, stay)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }
