"""The five pre-training objectives (SPEC 3), one loss per task, with static shapes.

Tasks (names used in schedules, logs and configs):
- ``mlm``: masked cross-modality language modelling, cross-entropy on masked word-pieces.
- ``match``: cross-modality matching, 2-way cross-entropy on the pooled output.
- ``obj`` / ``attr``: detected-label classification, confidence-weighted cross-entropy over all boxes.
- ``feat``: RoI-feature regression, Smooth-L1 on masked boxes (computed over all boxes, masked).
- ``qa``: image QA, cross-entropy over the answer table on labelled rows only.

The three visual losses are averaged over all B x O boxes and scaled by a normaliser: 1/0.15 in
the reference release and the paper's recipes, 6.67 in HF transformers (``HF_VISUAL_LOSS_NORMALIZER``).

A task whose rows carry no label on this rank (no masked word, no QA question) returns an exact
zero that is still a function of its head's parameters: every rank then runs the same graph and
gradient reduction never waits on a parameter that one rank skipped. It is never NaN.

No function here reads a tensor back to the host or makes a shape depend on data (no boolean-mask
indexing, no ``nonzero``): the masked-LM head runs on a fixed capacity of gathered positions,
the other losses use ``ignore_index`` or a dense mask, and accuracy counts stay on the device.
A training step therefore never waits on the GPU and compiles into one graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lxtrain import batch as B
from lxtrain import compiling
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.masking import IGNORE_INDEX, MASK_PROBABILITY

TASKS = ("mlm", "match", "obj", "attr", "feat", "qa")
RELEASE_VISUAL_LOSS_NORMALIZER = 1.0 / MASK_PROBABILITY
HF_VISUAL_LOSS_NORMALIZER = 6.67
DEFAULT_MLM_CAPACITY = 0.25
"""Share of B x T positions the masked-LM head evaluates: LXMERT masks 15% of the words, and
the padding of short sentences lowers that share further; labels beyond it are counted, not used."""


@dataclasses.dataclass
class ObjectiveOutput:
    """Per-task losses (unweighted), their weighted sum, and accuracy counts, all on the device.

    Every tensor here has a shape fixed by the batch's shape, never by its contents, so a training
    step computes them without reading anything back to the host (see ``pretraining_objectives``).
    """

    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    correct: dict[str, torch.Tensor]  # number of correct predictions per task with an accuracy
    counts: dict[str, torch.Tensor]  # number of labelled items behind each accuracy
    row_correct: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Per item for mlm (B, T) / match (B,) / qa (B,): True where the item is labelled and predicted right."""
    mlm_over_capacity: torch.Tensor | None = None
    """Masked-LM labels of this batch left out because they exceeded the head's capacity (0-dim)."""

    def accuracies(self) -> dict[str, float]:
        """Accuracy per task on this batch; tasks with no labelled item are left out (reads the host)."""
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


def mlm_capacity(batch_size: int, seq_len: int, fraction: float) -> int:
    """Token positions the masked-LM head evaluates per micro-batch: ``fraction`` of B x T, at least 1."""
    return max(1, min(batch_size * seq_len, math.ceil(fraction * batch_size * seq_len)))


def _cross_entropy_over_labelled(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the rows whose label is not ``IGNORE_INDEX``, with static shapes.

    Returns (loss, correct per row (bool, N; False at ignored rows), count of labelled rows). With
    no labelled row the loss is an exact 0 that still depends on the logits (so on the head's
    parameters), never the NaN of a mean over nothing.
    """
    labelled = labels != IGNORE_INDEX
    count = labelled.sum()
    summed = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct_rows = (logits.argmax(-1) == labels) & labelled
    return summed / count.clamp(min=1), correct_rows, count


def _masked_lm(
    model: LxmertForPretraining, language: torch.Tensor, labels: torch.Tensor, capacity_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked-LM loss over a fixed-capacity set of positions (BERT's max-predictions idea).

    The (N, V) vocabulary projection is the largest matmul of the model; it runs on ``capacity``
    gathered positions rather than all B x T. A stable sort puts the labelled positions first, so
    the gathered set holds every label while they fit and the padding rows carry IGNORE_INDEX.
    Labels beyond the capacity (row-major order) are left out of the loss and counted.

    Returns (loss, correct per position (bool, B x T), labelled count, labels over capacity).
    """
    batch_size, seq_len, _ = language.shape
    capacity = mlm_capacity(batch_size, seq_len, capacity_fraction)
    flat_labels = labels.reshape(-1)
    unlabelled = (flat_labels == IGNORE_INDEX).to(torch.uint8)
    positions = torch.sort(unlabelled, stable=True).indices[:capacity]  # labelled positions first
    gathered = language.reshape(batch_size * seq_len, -1).index_select(0, positions)  # (capacity, D)
    targets = flat_labels.index_select(0, positions)
    logits = model.mlm_head(gathered, model.word_embeddings)  # (capacity, V)
    loss, correct_gathered, count = _cross_entropy_over_labelled(logits, targets)
    correct = torch.zeros_like(flat_labels, dtype=torch.bool).index_copy(0, positions, correct_gathered)
    over_capacity = (flat_labels != IGNORE_INDEX).sum() - count
    return loss, correct.view_as(labels), count, over_capacity


def pretraining_objectives(
    model: LxmertForPretraining,
    batch: Mapping[str, torch.Tensor],
    task_weights: Mapping[str, float | torch.Tensor],
    *,
    visual_loss_normalizer: float = RELEASE_VISUAL_LOSS_NORMALIZER,
    mlm_capacity_fraction: float = DEFAULT_MLM_CAPACITY,
) -> ObjectiveOutput:
    """Run the backbone once and the heads of the active tasks; return losses and their weighted sum.

    Nothing here reads a tensor back to the host and every shape follows from the batch's shape,
    so a step is free of device synchronisations and compiles into one graph.

    Args:
        model: the network (unwrapped, or any module exposing the same attributes).
        batch: a collated batch (keys in ``lxtrain.batch``).
        task_weights: active tasks and their weights (numbers or 0-dim tensors); tasks not listed
            are not computed.
        visual_loss_normalizer: scale of the obj/attr/feat losses (1/0.15 release, 6.67 HF).
        mlm_capacity_fraction: share of the B x T positions the masked-LM head evaluates.
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
    over_capacity = None

    if "mlm" in task_weights:
        losses["mlm"], row_correct["mlm"], counts["mlm"], over_capacity = _masked_lm(
            model, out.language, batch[B.MLM_LABELS], mlm_capacity_fraction
        )
        correct["mlm"] = row_correct["mlm"].sum()

    pooled_tasks = {"match": (model.matching_head, B.MATCHED_LABELS), "qa": (model.answer_head, B.QA_LABELS)}
    for task, (head, label_key) in pooled_tasks.items():
        if task in task_weights:
            losses[task], row_correct[task], counts[task] = _cross_entropy_over_labelled(
                head(out.pooled), batch[label_key]
            )
            correct[task] = row_correct[task].sum()

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
            counts[task] = torch.full((), labels.numel(), dtype=torch.int64, device=labels.device)

        if "feat" in task_weights:
            # Dense over all B x O boxes, weighted by the mask (unmasked boxes contribute 0, and
            # the average is over all boxes, as in the reference).
            mask = batch[B.OBJECT_MASK]  # (B, O), 1 at masked boxes
            predicted = model.object_head.feature_regressor(object_hidden).float()  # (B, O, Fv)
            target = batch[B.FEATURE_TARGETS].to(predicted.dtype)
            per_box = F.smooth_l1_loss(predicted, target, reduction="none", beta=1.0).mean(-1)  # (B, O)
            losses["feat"] = (per_box * mask.to(per_box.dtype)).sum() / num_boxes * visual_loss_normalizer

    total = sum(task_weights[task] * loss for task, loss in losses.items())
    return ObjectiveOutput(
        losses=losses,
        total=total,
        correct=correct,
        counts=counts,
        row_correct=row_correct,
        mlm_over_capacity=over_capacity,
    )


class PretrainingObjective(torch.nn.Module):
    """The module a training engine wraps: ``forward(batch, task_weights) -> ObjectiveOutput``.

    Engines (DeepSpeed ZeRO-3 in particular) hook the wrapped module's forward, so the whole
    objective, heads included, runs inside one forward call. With ``compile_mode`` other than
    ``off`` (``lxtrain.compiling``) the training forward (model plus objective) runs as one
    ``torch.compile`` graph (``fullgraph=True``, static shapes); evaluation stays eager, its
    batches vary in size.
    """

    def __init__(
        self,
        model: LxmertForPretraining,
        visual_loss_normalizer: float = RELEASE_VISUAL_LOSS_NORMALIZER,
        zero_visual_input: bool = False,
        mlm_capacity_fraction: float = DEFAULT_MLM_CAPACITY,
        compile_mode: str = "off",
        compile_fallback: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.visual_loss_normalizer = visual_loss_normalizer
        self.zero_visual_input = zero_visual_input
        self.mlm_capacity_fraction = mlm_capacity_fraction
        self.compile_mode = compile_mode
        self.compile_fallback = compile_fallback  # --compile auto: a failure means eager, not an error
        self._compiled = compiling.compile_step(self._objectives, compile_mode)

    def _objectives(
        self, batch: dict[str, torch.Tensor], task_weights: Mapping[str, float]
    ) -> ObjectiveOutput:
        dtype = self.model.backbone.pooler.weight.dtype
        batch = dict(batch)  # the caller's dict stays as it was
        for key in (B.OBJECT_FEATURES, B.OBJECT_BOXES):
            # Mixed precision: the engine casts weights, inputs follow them here.
            value = batch[key].to(dtype)
            batch[key] = torch.zeros_like(value) if self.zero_visual_input else value
        return pretraining_objectives(
            self.model,
            batch,
            task_weights,
            visual_loss_normalizer=self.visual_loss_normalizer,
            mlm_capacity_fraction=self.mlm_capacity_fraction,
        )

    @property
    def compiled(self) -> bool:
        """Whether training forwards run compiled (False with --compile off, or after a fallback)."""
        return self._compiled is not None

    def forward(
        self, batch: Mapping[str, torch.Tensor], task_weights: Mapping[str, float]
    ) -> ObjectiveOutput:
        tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
        if self._compiled is None or not self.training:
            return self._objectives(tensors, task_weights)
        check_task_weights(task_weights)  # a clear error, not a tracing failure
        try:
            return self._compiled(tensors, dict(task_weights))
        except Exception as error:
            if not compiling.is_compile_error(error):
                raise
            if not self.compile_fallback:
                raise compiling.CompileFailed(self.compile_mode, error) from error
            compiling.report_fallback(error)
            self._compiled = None
            return self._objectives(tensors, task_weights)
