"""Pre-training validation: every task's loss and accuracy, QA accuracy per sentence source,
masked object-word accuracy (over all sentences and over matched ones), and an attention figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lxtrain import batch as B
from lxtrain import distributed
from lxtrain.model.inspection import capture_cross_attention, language_to_vision_attention
from lxtrain.monitor import Monitor
from lxtrain.tasks.meter import TaskMeter
from lxtrain.tasks.objectives import TASKS

if TYPE_CHECKING:
    from lxtrain.tasks.pretraining import PretrainData


def object_word_tally(
    mlm_labels: torch.Tensor, matched: torch.Tensor, mlm_correct: torch.Tensor, object_words: torch.Tensor
) -> torch.Tensor:
    """Masked object words predicted right, and their count: row 0 over every sentence, row 1 over
    the sentences that describe the image shown (``matched``), where only the image can decide the
    word; on mismatched pairs the best any model can do is the words' prior.

    ``mlm_correct`` is (B, T) like ``mlm_labels``: True where a masked word was predicted right
    (``ObjectiveOutput.row_correct["mlm"]``).
    """
    is_object_word = (mlm_labels != -100) & torch.isin(mlm_labels, object_words)
    on_matched = is_object_word & (matched[:, None] == 1)
    return torch.tensor(
        [
            [float((mlm_correct & is_object_word).sum()), float(is_object_word.sum())],
            [float((mlm_correct & on_matched).sum()), float(on_matched.sum())],
        ],
        dtype=torch.float64,
    )


@torch.no_grad()
def validate(
    engine, data: PretrainData, model_config, monitor: Monitor, step: int, max_batches: int | None
) -> dict:
    """Every task's loss and accuracy, QA accuracy per source, and an attention image; a collective."""
    engine.eval()
    meter = TaskMeter(engine.device)
    qa_by_source = torch.zeros(2, len(B.SENTENCE_SOURCE_NAMES), dtype=torch.float64)
    all_tasks = dict.fromkeys(TASKS, 1.0)
    device = engine.device
    object_words = torch.tensor(data.object_word_ids, dtype=torch.int64)
    object_word_hits = torch.zeros(2, 2, dtype=torch.float64)
    first_batch = attention = None
    for batch, counted in data.valid_batches(max_batches):
        batch = B.to_device(batch, device)
        if first_batch is None:
            with capture_cross_attention(engine.module.model) as captured:
                output = engine(batch, all_tasks)
            attention = language_to_vision_attention(captured, model_config.num_attention_heads)
            first_batch = batch
        else:
            output = engine(batch, all_tasks)
        if not counted:
            continue
        meter.add(output)
        labelled = batch[B.QA_LABELS].cpu() != -100
        sources = batch[B.SENTENCE_SOURCES].cpu()[labelled]
        qa_by_source[0].index_add_(0, sources, output.row_correct["qa"].cpu()[labelled].double())
        qa_by_source[1].index_add_(0, sources, torch.ones_like(sources, dtype=torch.float64))
        object_word_hits += object_word_tally(
            batch[B.MLM_LABELS].cpu(),
            batch[B.MATCHED_LABELS].cpu(),
            output.row_correct["mlm"].cpu(),
            object_words,
        )
    losses, accuracies = meter.reduce()
    if dist.is_initialized():
        distributed.all_reduce_(qa_by_source)
        distributed.all_reduce_(object_word_hits)
    names = ("mlm_object_words", "mlm_object_words_matched")
    for name, (hits, count) in zip(names, object_word_hits.tolist(), strict=True):
        if count > 0:
            accuracies[name] = hits / count
    qa_sources = {
        name: float(qa_by_source[0, i] / qa_by_source[1, i])
        for i, name in enumerate(B.SENTENCE_SOURCE_NAMES)
        if qa_by_source[1, i] > 0
    }
    monitor.scalars("valid/loss", losses, step)
    monitor.scalars("valid/acc", accuracies, step)
    monitor.scalars("valid/qa_acc", qa_sources, step)
    if monitor.enabled and first_batch is not None:
        _log_attention(monitor, data, attention, first_batch, step)
    engine.train()
    return {"loss": losses, "acc": accuracies, "qa_acc_by_source": qa_sources}


def _log_attention(
    monitor: Monitor, data: PretrainData, attention: torch.Tensor, batch: dict, step: int
) -> None:
    """A labelled figure of words over boxes (mean over heads) for one example of the batch."""
    # Imported here: matplotlib is only needed on the rank that draws (see Monitor.figure).
    from lxtrain.figures import language_to_vision_figure, object_class_names

    names = object_class_names(data.valid.index)
    figure, words = language_to_vision_figure(batch, attention, data.decode_tokens, names, step)
    monitor.figure("attention/language_to_vision", figure, step)
    monitor.text("attention/words", " | ".join(words), step)
