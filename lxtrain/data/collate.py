"""Turn drawn (image, sentence) picks into one collated pre-training batch (``lxtrain.batch``).

Everything random for a batch (matching, QA target, word and object masks, donors) comes from
one generator seeded by (seed, epoch, slot, batch number), so a batch is a pure function of
the buffer state and its number: a resumed loader reproduces it without replaying the
batches before it, and a validation pass gives the same masks every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lxtrain import batch as B
from lxtrain.data.plan import SlotPlan
from lxtrain.data.sampler import BufferedImage
from lxtrain.data.shard_format import ImageSample
from lxtrain.data.tokenizer import WordPieceEncoder
from lxtrain.tasks.masking import IGNORE_INDEX, mask_objects, mask_words

_SOURCE_IDS = {name: i for i, name in enumerate(B.SENTENCE_SOURCE_NAMES)}

IMAGE_IDS = "image_ids"
"""Extra key with ``with_ids``: (B,) int64 global image id of each example (tests, debugging)."""
SENTENCE_IDS = "sentence_ids"
"""Extra key with ``with_ids``: (B,) int64 global id of the sentence each example consumed."""

DONOR_IMAGES = 2
"""Images (outside the batch) whose boxes are the random replacements of object masking."""

MASK_CHUNK_BYTES = 8 << 20
"""Object masking works on chunks of at most this many feature bytes (see _mask_objects)."""


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
        plan: SlotPlan,
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

        # The large arrays are allocated by numpy, which asks for transparent huge pages (first
        # touch ~5x cheaper than torch's allocator here), and converted from float16 by torch,
        # whose cast is vectorised (numpy's is ~6x slower); from_numpy shares the memory.
        if buffers is None:
            target_tensor = torch.from_numpy(
                np.empty((size, self.num_boxes, self.feature_dim), dtype=np.float32)
            )
        else:
            target_tensor = buffers[B.FEATURE_TARGETS][:size]
        for row, image in enumerate(images):
            target_tensor[row].copy_(torch.from_numpy(image.features))
        targets = target_tensor.numpy()
        sizes = np.array([[i.img_w, i.img_h, i.img_w, i.img_h] for i in images], dtype=np.float32)
        boxes = np.stack([image.boxes for image in images]) / sizes[:, None, :]
        np.clip(boxes, 0.0, 1.0, out=boxes)
        if buffers is None:
            features, object_mask = self._mask_objects(targets, images, candidates, rng)
            feature_tensor = torch.from_numpy(features)
        else:
            # The batch must hold the shared tensors themselves (not from_numpy views of them,
            # which would be new, unshared storages) for the data loader to pass them by handle.
            feature_tensor = buffers[B.OBJECT_FEATURES][:size]
            _, object_mask = self._mask_objects(targets, images, candidates, rng, out=feature_tensor.numpy())

        batch = {
            B.INPUT_IDS: torch.from_numpy(input_ids),
            B.ATTENTION_MASK: torch.from_numpy(attention),
            B.TOKEN_TYPE_IDS: torch.zeros(token_ids.shape, dtype=torch.int64),
            B.OBJECT_FEATURES: feature_tensor,
            B.OBJECT_BOXES: torch.from_numpy(boxes),
            B.MLM_LABELS: torch.from_numpy(mlm_labels),
            B.FEATURE_TARGETS: target_tensor,
            B.OBJECT_MASK: torch.from_numpy(object_mask),
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
        spec |= {
            key: ((batch_size, boxes, dim), torch.float32) for key in (B.OBJECT_FEATURES, B.FEATURE_TARGETS)
        }
        spec[B.OBJECT_BOXES] = ((batch_size, boxes, 4), torch.float32)
        for key in (B.OBJECT_MASK, B.OBJECT_CONFIDENCES, B.ATTRIBUTE_CONFIDENCES):
            spec[key] = ((batch_size, boxes), torch.float32)
        for key in (B.OBJECT_LABELS, B.ATTRIBUTE_LABELS):
            spec[key] = ((batch_size, boxes), torch.int64)
        for key in (B.MATCHED_LABELS, B.QA_LABELS, B.SENTENCE_SOURCES):
            spec[key] = ((batch_size,), torch.int64)
        if self.with_ids:
            spec[IMAGE_IDS] = spec[SENTENCE_IDS] = ((batch_size,), torch.int64)
        return spec

    def _mask_objects(
        self,
        targets: np.ndarray,
        images: list[ImageSample],
        candidates: list[BufferedImage],
        rng: np.random.Generator,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Object masking whose random replacements always come from another image.

        The batch is masked in chunks of at most ``MASK_CHUNK_BYTES``: a chunk's temporary copy
        stays below glibc's mmap threshold, so its memory is reused from batch to batch instead
        of being mapped (and page-faulted) afresh, the largest system-time cost of a worker.
        """
        features = np.empty_like(targets) if out is None else out
        selected = np.empty(targets.shape[:2], dtype=np.float32)
        in_batch = {image.img_id for image in images}
        outside = [c.data for c in candidates if c.data.img_id not in in_batch]
        if outside:
            chosen = rng.choice(len(outside), size=min(DONOR_IMAGES, len(outside)), replace=False)
            donors = np.concatenate([outside[i].features for i in sorted(chosen.tolist())]).astype(np.float32)
            step = max(1, MASK_CHUNK_BYTES // max(targets[0].nbytes, 1))
            for start in range(0, len(targets), step):
                rows = slice(start, start + step)
                features[rows], selected[rows] = mask_objects(
                    targets[rows], rng, donor_features=donors, probability=self.object_mask_probability
                )
            return features, selected
        # Every buffered image is in the batch (the end of a stream): per image, donors are the
        # other images of the batch; a batch of one image can only use its own boxes.
        image_ids = np.array([image.img_id for image in images])
        for img_id in dict.fromkeys(image_ids.tolist()):
            rows = image_ids == img_id
            donors = targets[~rows] if (~rows).any() else targets[rows]
            features[rows], selected[rows] = mask_objects(
                targets[rows],
                rng,
                donor_features=donors.reshape(-1, self.feature_dim),
                probability=self.object_mask_probability,
            )
        return features, selected


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
