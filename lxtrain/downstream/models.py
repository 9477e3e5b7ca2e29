"""Fine-tuning networks (SPEC 4): the pre-trained backbone plus a task head, and their losses.

- VQA / GQA: ``AnswerHead`` (D -> 2D -> GELU -> LN -> answers) on the pooled cross-modality
  output; binary cross-entropy against the soft scores, times the number of answers (the
  reference's scaling, which makes the loss a sum over answers rather than a mean).
- NLVR2: (img0, sentence) and (img1, sentence) encoded separately by the same backbone; the two
  pooled vectors concatenated (2D) -> Linear 2D -> GELU -> LN -> Linear to 2; cross-entropy.

Single-device code, like ``lxtrain.model``: DeepSpeed wraps ``FinetuneObjective``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lxtrain import batch as B
from lxtrain.data.answers import normalize_answer
from lxtrain.model import LxmertBackbone, LxmertConfig, LxmertForPretraining
from lxtrain.model.heads import AnswerHead

TARGETS = "targets"  # (B, A) float32 soft scores over the task's answer table (VQA/GQA)
PAIR_LABELS = "pair_labels"  # (B,) int64, 1 = statement true, 0 = false, -100 = unlabelled (NLVR2)
IGNORE_INDEX = -100


class AnswerTableMismatch(ValueError):
    """An answer table that does not fit a checkpoint's answer head."""


def _init_new_modules(model: nn.Module, config: LxmertConfig, *modules: nn.Module) -> None:
    # New heads get LXMERT's own init (normal 0.02, zero bias, unit LayerNorm), borrowed from the
    # pre-training model so the two never drift apart.
    holder = type("_InitHolder", (), {"config": config})()
    for module in modules:
        module.apply(functools.partial(LxmertForPretraining._init_weights, holder))


class PairClassifier(nn.Module):
    """NLVR2 head on the two pooled vectors: 2D -> 2D -> GELU -> LayerNorm -> 2 classes."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        width = 2 * config.hidden_size
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(width, 2)

    def forward(self, pooled_pair: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(F.gelu(self.dense(pooled_pair))))


class QAModel(nn.Module):
    """Backbone + answer head over the task's answer table (VQA, GQA)."""

    def __init__(self, config: LxmertConfig, num_answers: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = LxmertBackbone(config)
        self.head = AnswerHead(config, num_answers)
        _init_new_modules(self, config, self.backbone, self.head)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, A) answer logits."""
        out = self.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))
        return self.head(out.pooled)


class NLVR2Model(nn.Module):
    """Backbone applied to both images of a pair with the same sentence + the pair classifier."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = LxmertBackbone(config)
        self.head = PairClassifier(config)
        _init_new_modules(self, config, self.backbone, self.head)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) logits; object features and boxes come as (B, 2, O, ...)."""
        size = batch[B.INPUT_IDS].shape[0]

        def twice(tensor: torch.Tensor) -> torch.Tensor:  # row i -> rows 2i (img0) and 2i+1 (img1)
            return tensor.repeat_interleave(2, dim=0)

        out = self.backbone(
            twice(batch[B.INPUT_IDS]),
            twice(batch[B.ATTENTION_MASK]),
            twice(batch[B.TOKEN_TYPE_IDS]),
            batch[B.OBJECT_FEATURES].flatten(0, 1),
            batch[B.OBJECT_BOXES].flatten(0, 1),
        )
        return self.head(out.pooled.reshape(size, 2 * self.config.hidden_size))


def build_model(task: str, config: LxmertConfig, num_answers: int | None) -> QAModel | NLVR2Model:
    if task == "nlvr2":
        return NLVR2Model(config)
    if not num_answers:
        raise ValueError(f"task {task} needs an answer table (none found in the shard index)")
    return QAModel(config, num_answers)


@dataclass
class TransferReport:
    """What the answer-head transfer did: answers copied from pre-training, and the rest."""

    shared: int
    total: int
    examples_missing: list[str]

    def __str__(self) -> str:
        return (
            f"answer head: {self.shared}/{self.total} answers initialised from the pre-training QA head, "
            f"{self.total - self.shared} zero-initialised (e.g. {self.examples_missing[:5]})"
        )


@torch.no_grad()
def transfer_answer_head(
    source: AnswerHead,
    source_answers: Sequence[str] | None,
    target: AnswerHead,
    target_answers: Sequence[str],
) -> TransferReport:
    """Initialise ``target`` from the pre-training QA head (SPEC 4).

    The hidden layers (dense, LayerNorm) are copied; each output row of an answer both tables
    hold (compared after ``normalize_answer``) is copied with its bias; every other row and bias
    is zero, so a new answer starts at logit 0 rather than at a random one. Without a
    pre-training table (``source_answers`` None) no row can be matched: all rows are zero.
    """
    rows = source.classifier.out_features
    if source_answers is not None and len(source_answers) != rows:
        raise AnswerTableMismatch(
            f"the pre-training answer table has {len(source_answers)} answers but the checkpoint's QA head "
            f"has {rows} outputs: the table is not the one this checkpoint was trained with "
            "(pass the right one with --pretrain-answers)"
        )
    if len(target_answers) != target.classifier.out_features:
        raise AnswerTableMismatch(
            f"the task answer table has {len(target_answers)} answers but the head has "
            f"{target.classifier.out_features} outputs"
        )
    target.dense.load_state_dict(source.dense.state_dict())
    target.norm.load_state_dict(source.norm.state_dict())
    target.classifier.weight.zero_()
    target.classifier.bias.zero_()
    source_ids: dict[str, int] = {}
    for index, answer in enumerate(source_answers or ()):
        source_ids.setdefault(normalize_answer(answer), index)
    missing = []
    for index, answer in enumerate(target_answers):
        source_index = source_ids.get(normalize_answer(answer))
        if source_index is None:
            missing.append(answer)
            continue
        target.classifier.weight[index] = source.classifier.weight[source_index]
        target.classifier.bias[index] = source.classifier.bias[source_index]
    return TransferReport(len(target_answers) - len(missing), len(target_answers), missing)


@dataclass
class FinetuneOutput:
    """One forward: the loss (a 0-dim tensor), the logits and the per-row correctness counts."""

    total: torch.Tensor
    logits: torch.Tensor
    score_sum: torch.Tensor  # sum over labelled rows of the soft score (QA) or 0/1 correctness (NLVR2)
    labelled: torch.Tensor  # number of labelled rows


class FinetuneObjective(nn.Module):
    """The model plus its task loss; what the DeepSpeed engine wraps (``.model`` holds the weights)."""

    def __init__(self, model: QAModel | NLVR2Model, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> FinetuneOutput:
        dtype = self.model.backbone.pooler.weight.dtype
        batch = dict(batch)
        for key in (B.OBJECT_FEATURES, B.OBJECT_BOXES):
            batch[key] = batch[key].to(dtype)  # mixed precision: inputs follow the engine's weights
        logits = self.model(batch).float()
        if self.task == "nlvr2":
            labels = batch[PAIR_LABELS]
            labelled = labels != IGNORE_INDEX
            count = labelled.sum().float()
            # The mean over labelled rows without asking the host whether there are any: a batch
            # without labels gives 0 (0 x logits through the summed loss), so every rank still runs
            # the same backward graph, and no step waits for the device.
            per_row = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
            loss = per_row.sum() / count.clamp(min=1.0)
            correct = (logits.argmax(-1) == labels) & labelled
            return FinetuneOutput(loss, logits, correct.sum().float(), count)
        targets = batch[TARGETS]
        loss = F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]
        score = targets.gather(1, logits.argmax(-1, keepdim=True)).sum()
        rows = torch.full((), float(logits.shape[0]), device=logits.device)
        return FinetuneOutput(loss, logits, score.detach(), rows)
