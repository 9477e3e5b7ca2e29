"""Turn drawn (image, sentence) picks into one collated pre-training batch (``lxtrain.batch``).

Everything random for a batch (matching, QA target, word masks, the object-masking draws and
their donor boxes) comes from one generator seeded by (seed, epoch, stream, batch number), so a
batch is a pure function of the buffer state and its number: a resumed loader reproduces it
without replaying the batches before it, and a validation pass gives the same masks every time.
Object masking is drawn here but applied on the training device (see :mod:`lxtrain.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lxtrain import batch as B
from lxtrain.data.plan import StreamPlan
from lxtrain.data.sampler import BufferedImage
from lxtrain.data.shard_format import ImageSample
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.tasks.masking import IGNORE_INDEX, draw_object_masks, mask_words

_SOURCE_IDS = {name: i for i, name in enumerate(B.SENTENCE_SOURCE_NAMES)}

IMAGE_IDS = "image_ids"
"""Extra key with ``with_ids``: (B,) int64 global image id of each example (tests, debugging)."""
SENTENCE_IDS = "sentence_ids"
"""Extra key with ``with_ids``: (B,) int64 global id of the sentence each example consumed."""


@dataclass
class BatchBuilder:
    """Builds batches; one per data-loader worker.

    Attributes:
        encoder: the WordPiece encoder.
        num_boxes, feature_dim: O and D of the shard set.
        mismatch_probability: share of examples whose sentence is swapped for another image's.
        word_mask_probability, object_mask_probability: selection rates (SPEC 3).
        object_word_ids, object_word_mask_probability: word-pieces masked at their own rate
            (None: at ``word_mask_probability``; see :func:`lxtrain.tasks.masking.mask_words`).
        with_ids: add ``image_ids``/``sentence_ids`` to each batch.
    """

    encoder: WordPieceEncoder
    num_boxes: int
    feature_dim: int
    mismatch_probability: float = 0.5
    word_mask_probability: float = 0.15
    object_mask_probability: float = 0.15
    with_ids: bool = False
    object_word_ids: tuple[int, ...] = ()
    object_word_mask_probability: float | None = None

    def build(
        self,
        picks: list[tuple[BufferedImage, int]],
        candidates: list[BufferedImage],
        plan: StreamPlan,
        rng: np.random.Generator,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch from the picks; every random draw comes from ``rng``.

        ``buffers`` are optional preallocated tensors, one per key with a leading dimension of at
        least B (see :meth:`batch_spec`), that the batch is written into (the loader's
        shared-memory ring); the returned tensors are then slices of them.
        """
        size = len(picks)
        images: list[ImageSample] = [entry.data for entry, _ in picks]
        # A fixed number of draws per batch keeps the stream independent of which branch runs.
        mismatch_draw = rng.random(size)
        negative_image = rng.integers(0, max(len(candidates), 1), size)
        negative_sentence = rng.random(size)
        qa_draw = rng.random(size)

        texts: list[str] = []
        sources = np.empty(size, dtype=np.int64)
        matched = np.ones(size, dtype=np.int64)
        qa_labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
        for row, (_, local) in enumerate(picks):
            sentence = images[row].sentences[local]
            if mismatch_draw[row] < self.mismatch_probability:
                other = _other_image(candidates, int(negative_image[row]), images[row].img_id)
                if other is not None:
                    sentences = other.sentences
                    sentence = sentences[
                        min(int(negative_sentence[row] * len(sentences)), len(sentences) - 1)
                    ]
                    matched[row] = 0
            if matched[row] and sentence["answer_ids"]:
                qa_labels[row] = _sample_answer(
                    sentence["answer_ids"], sentence["answer_scores"], qa_draw[row]
                )
            texts.append(sentence["text"])
            sources[row] = _SOURCE_IDS[sentence["source"]]

        token_ids, attention = self.encoder.encode(texts)
        input_ids, mlm_labels = mask_words(
            token_ids,
            rng,
            mask_token_id=self.encoder.mask_id,
            vocab_size=self.encoder.vocab_size,
            special_token_ids=self.encoder.special_ids,
            probability=self.word_mask_probability,
            object_word_ids=self.object_word_ids,
            object_word_probability=self.object_word_mask_probability,
        )

        # The features are shipped once, unmasked, in the shards' float16: object masking is only
        # drawn here and applied on the training device (lxtrain.tasks.masking.apply_object_masks),
        # which makes a batch ~4x smaller than two float32 copies and saves the host the upcast.
        # numpy allocates the large array: it asks for transparent huge pages, whose first touch is
        # ~5x cheaper than torch's allocator here; from_numpy shares the memory.
        if buffers is None:
            features = torch.from_numpy(np.empty((size, self.num_boxes, self.feature_dim), dtype=np.float16))
        else:
            features = buffers[B.UNMASKED_FEATURES][:size]
        np.stack([image.features for image in images], out=features.numpy())
        actions, donors = draw_object_masks(
            [image.img_id for image in images], self.num_boxes, rng, self.object_mask_probability
        )
        sizes = np.array([[i.img_w, i.img_h, i.img_w, i.img_h] for i in images], dtype=np.float32)
        boxes = np.stack([image.boxes for image in images]) / sizes[:, None, :]
        np.clip(boxes, 0.0, 1.0, out=boxes)

        batch = {
            B.INPUT_IDS: torch.from_numpy(input_ids),
            B.ATTENTION_MASK: torch.from_numpy(attention),
            B.TOKEN_TYPE_IDS: torch.zeros(token_ids.shape, dtype=torch.int64),
            B.UNMASKED_FEATURES: features,
            B.OBJECT_BOXES: torch.from_numpy(boxes),
            B.MLM_LABELS: torch.from_numpy(mlm_labels),
            B.OBJECT_MASK_ACTIONS: torch.from_numpy(actions),
            B.OBJECT_MASK_DONORS: torch.from_numpy(donors),
            B.OBJECT_LABELS: torch.from_numpy(np.stack([i.objects_id for i in images]).astype(np.int64)),
            B.OBJECT_CONFIDENCES: torch.from_numpy(
                np.stack([i.objects_conf for i in images]).astype(np.float32)
            ),
            B.ATTRIBUTE_LABELS: torch.from_numpy(np.stack([i.attrs_id for i in images]).astype(np.int64)),
            B.ATTRIBUTE_CONFIDENCES: torch.from_numpy(
                np.stack([i.attrs_conf for i in images]).astype(np.float32)
            ),
            B.MATCHED_LABELS: torch.from_numpy(matched),
            B.QA_LABELS: torch.from_numpy(qa_labels),
            B.SENTENCE_SOURCES: torch.from_numpy(sources),
        }
        if self.with_ids:
            positions = np.array([entry.position for entry, _ in picks], dtype=np.int64)
            locals_ = np.array([local for _, local in picks], dtype=np.int64)
            batch[IMAGE_IDS] = torch.from_numpy(plan.image_id[positions])
            batch[SENTENCE_IDS] = torch.from_numpy(plan.sentence_base[positions] + locals_)
        if buffers is not None:
            for key, value in batch.items():
                if value.data_ptr() != buffers[key].data_ptr():
                    batch[key] = buffers[key][:size].copy_(value)
        return batch

    def batch_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor of a full batch."""
        length, boxes, dim = self.encoder.max_length, self.num_boxes, self.feature_dim
        spec = {key: ((batch_size, length), torch.int64) for key in (B.INPUT_IDS, B.ATTENTION_MASK)}
        spec |= {
            B.TOKEN_TYPE_IDS: ((batch_size, length), torch.int64),
            B.MLM_LABELS: ((batch_size, length), torch.int64),
        }
        spec[B.UNMASKED_FEATURES] = ((batch_size, boxes, dim), torch.float16)
        spec[B.OBJECT_MASK_ACTIONS] = ((batch_size, boxes), torch.int8)
        spec[B.OBJECT_BOXES] = ((batch_size, boxes, 4), torch.float32)
        for key in (B.OBJECT_CONFIDENCES, B.ATTRIBUTE_CONFIDENCES):
            spec[key] = ((batch_size, boxes), torch.float32)
        for key in (B.OBJECT_LABELS, B.ATTRIBUTE_LABELS, B.OBJECT_MASK_DONORS):
            spec[key] = ((batch_size, boxes), torch.int64)
        for key in (B.MATCHED_LABELS, B.QA_LABELS, B.SENTENCE_SOURCES):
            spec[key] = ((batch_size,), torch.int64)
        if self.with_ids:
            spec[IMAGE_IDS] = spec[SENTENCE_IDS] = ((batch_size,), torch.int64)
        return spec


def _other_image(candidates: list[BufferedImage], start: int, img_id: str) -> ImageSample | None:
    """The candidate at ``start``, or the next one if it is the same image; None if none differs."""
    for offset in range(min(len(candidates), 2)):
        image = candidates[(start + offset) % len(candidates)].data
        if image.img_id != img_id:
            return image
    return None


def _sample_answer(answer_ids: list[int], scores: list[float], draw: float) -> int:
    """An answer drawn with probability proportional to its soft score (argmax if all are 0)."""
    weights = np.asarray(scores, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        return int(answer_ids[int(np.argmax(weights))])
    position = int(np.searchsorted(np.cumsum(weights), draw * total, side="right"))
    return int(answer_ids[min(position, len(answer_ids) - 1)])
