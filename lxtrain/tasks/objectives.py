"""The five pre-training objectives (SPEC 3), one loss per task, each head evaluated sparsely.

Tasks (names used in schedules, logs and configs):
- ``mlm``: masked cross-modality language modelling, cross-entropy on masked word-pieces.
- ``match``: cross-modality matching, 2-way cross-entropy on the pooled output.
- ``obj`` / ``attr``: detected-label classification, confidence-weighted cross-entropy over all boxes.
- ``feat``: RoI-feature regression, Smooth-L1 on masked boxes.
- ``qa``: image QA, cross-entropy over the answer table on labelled rows only.

The three visual losses are averaged over all B x O boxes and scaled by a normaliser: 1/0.15 in
the reference release and the paper's recipes, 6.67 in HF transformers (``HF_VISUAL_LOSS_NORMALIZER``).

A task whose rows carry no label on this rank (no masked word, no QA question) returns an exact
zero that is still a function of its head's parameters: every rank then runs the same graph and
gradient reduction never waits on a parameter that one rank skipped. It is never NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lxtrain import batch as B
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.masking import IGNORE_INDEX, MASK_PROBABILITY

TASKS = ("mlm", "match", "obj", "attr", "feat", "qa")
RELEASE_VISUAL_LOSS_NORMALIZER = 1.0 / MASK_PROBABILITY
HF_VISUAL_LOSS_NORMALIZER = 6.67


@dataclasses.dataclass
class ObjectiveOutput:
    """Per-task losses (unweighted), their weighted sum, and accuracy counts."""

    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    correct: dict[str, torch.Tensor]  # number of correct predictions per task with an accuracy
    counts: dict[str, torch.Tensor]  # number of labelled items behind each accuracy
    row_correct: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Per labelled item (bool, N) for mlm / match / qa, in the order of ``labels[labels != IGNORE]``."""

    def accuracies(self) -> dict[str, float]:
        """Accuracy per task on this batch; tasks with no labelled item are left out."""
        return {
            name: float(self.correct[name] / self.counts[name])
            for name in self.correct
            if self.counts[name] > 0
        }


def check_task_weights(task_weights: Mapping[str, float]) -> None:
    if not task_weights:
        raise ValueError(f"no active pre-training task: give at least one of {list(TASKS)} a weight")
    unknown = sorted(set(task_weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown pre-training task(s) {unknown}; known tasks: {list(TASKS)}")


def _labelled_cross_entropy(
    head_input: torch.Tensor, labels: torch.Tensor, head
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``head`` over rows whose label is not ignored.

    Returns (loss, correct per labelled row (bool, N), count of labelled rows).
    """
    rows = labels != IGNORE_INDEX
    logits = head(head_input[rows])  # (N, C): only labelled rows go through the head
    targets = labels[rows]
    count = rows.sum()
    correct_rows = logits.argmax(-1) == targets
    if targets.numel() == 0:
        # logits is empty: its sum is an exact 0 that still depends on the head's parameters.
        return logits.sum() * 0.0, correct_rows, count
    return F.cross_entropy(logits.float(), targets), correct_rows, count


def pretraining_objectives(
    model: LxmertForPretraining,
    batch: Mapping[str, torch.Tensor],
    task_weights: Mapping[str, float],
    *,
    visual_loss_normalizer: float = RELEASE_VISUAL_LOSS_NORMALIZER,
) -> ObjectiveOutput:
    """Run the backbone once and the heads of the active tasks; return losses and their weighted sum.

    Args:
        model: the network (unwrapped, or any module exposing the same attributes).
        batch: a collated batch (keys in ``lxtrain.batch``).
        task_weights: active tasks and their weights; tasks not listed are not computed.
        visual_loss_normalizer: scale of the obj/attr/feat losses (1/0.15 release, 6.67 HF).
    """
    check_task_weights(task_weights)
    out = model.backbone(
        batch[B.INPUT_IDS],
        batch[B.ATTENTION_MASK],
        batch.get(B.TOKEN_TYPE_IDS),
        batch[B.OBJECT_FEATURES],
        batch[B.OBJECT_BOXES],
    )
    losses: dict[str, torch.Tensor] = {}
    correct: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    row_correct: dict[str, torch.Tensor] = {}

    if "mlm" in task_weights:
        # The (N, V) vocabulary projection runs on masked positions only: same loss as the dense
        # head, about 1/0.15 times less compute in the largest matmul of the model.
        def mlm_head(hidden: torch.Tensor) -> torch.Tensor:
            return model.mlm_head(hidden, model.word_embeddings)

        losses["mlm"], rows_correct, counts["mlm"] = _labelled_cross_entropy(
            out.language, batch[B.MLM_LABELS], mlm_head
        )
        correct["mlm"], row_correct["mlm"] = rows_correct.sum(), rows_correct

    if "match" in task_weights:
        losses["match"], rows_correct, counts["match"] = _labelled_cross_entropy(
            out.pooled, batch[B.MATCHED_LABELS], model.matching_head
        )
        correct["match"], row_correct["match"] = rows_correct.sum(), rows_correct

    if "qa" in task_weights:
        losses["qa"], rows_correct, counts["qa"] = _labelled_cross_entropy(
            out.pooled, batch[B.QA_LABELS], model.answer_head
        )
        correct["qa"], row_correct["qa"] = rows_correct.sum(), rows_correct

    visual_tasks = [task for task in ("obj", "attr", "feat") if task in task_weights]
    if visual_tasks:
        object_hidden = model.object_head.transform(out.objects)  # (B, O, D)
        num_boxes = object_hidden.shape[0] * object_hidden.shape[1]
        label_tasks = {
            "obj": (model.object_head.object_classifier, B.OBJECT_LABELS, B.OBJECT_CONFIDENCES),
            "attr": (model.object_head.attribute_classifier, B.ATTRIBUTE_LABELS, B.ATTRIBUTE_CONFIDENCES),
        }
        for task, (classifier, label_key, confidence_key) in label_tasks.items():
            if task not in task_weights:
                continue
            logits = classifier(object_hidden).flatten(0, 1).float()  # (B*O, C)
            labels = batch[label_key].flatten()
            per_box = F.cross_entropy(logits, labels, reduction="none")
            weighted = per_box * batch[confidence_key].flatten().to(per_box.dtype)
            losses[task] = weighted.mean() * visual_loss_normalizer
            correct[task] = (logits.argmax(-1) == labels).sum()
            counts[task] = torch.tensor(labels.numel(), device=labels.device)

        if "feat" in task_weights:
            mask = batch[B.OBJECT_MASK]  # (B, O), 1 at masked boxes
            selected = mask > 0
            predicted = model.object_head.feature_regressor(object_hidden[selected]).float()  # (N, Fv)
            target = batch[B.FEATURE_TARGETS][selected].to(predicted.dtype)
            per_box = F.smooth_l1_loss(predicted, target, reduction="none", beta=1.0).mean(-1)  # (N,)
            # Average over all B x O boxes (unmasked ones contribute 0), as the reference does.
            losses["feat"] = (per_box * mask[selected]).sum() / num_boxes * visual_loss_normalizer

    total = sum(task_weights[task] * loss for task, loss in losses.items())
    return ObjectiveOutput(
        losses=losses, total=total, correct=correct, counts=counts, row_correct=row_correct
    )


class PretrainingObjective(torch.nn.Module):
    """The module a training engine wraps: ``forward(batch, task_weights) -> ObjectiveOutput``.

    Engines (DeepSpeed ZeRO-3 in particular) hook the wrapped module's forward, so the whole
    objective, heads included, runs inside one forward call.
    """

    def __init__(
        self,
        model: LxmertForPretraining,
        visual_loss_normalizer: float = RELEASE_VISUAL_LOSS_NORMALIZER,
        zero_visual_input: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.visual_loss_normalizer = visual_loss_normalizer
        self.zero_visual_input = zero_visual_input

    def forward(
        self, batch: Mapping[str, torch.Tensor], task_weights: Mapping[str, float]
    ) -> ObjectiveOutput:
        dtype = self.model.backbone.pooler.weight.dtype
        batch = dict(batch)
        for key in (B.OBJECT_FEATURES, B.OBJECT_BOXES):
            # Mixed precision: the engine casts weights, inputs follow them here.
            value = batch[key].to(dtype)
            batch[key] = torch.zeros_like(value) if self.zero_visual_input else value
        return pretraining_objectives(
            self.model, batch, task_weights, visual_loss_normalizer=self.visual_loss_normalizer
        )
