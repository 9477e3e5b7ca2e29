"""From logits to predictions, metrics and submission files: shared by fine-tuning and evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lxtrain.downstream import metrics
from lxtrain.downstream.data import META
from lxtrain.downstream.metrics import PairPrediction, QAPrediction

PRIMARY_METRIC = {"vqa": "accuracy", "gqa": "accuracy", "nlvr2": "accuracy"}


def predictions_from_logits(
    task: str, logits: torch.Tensor, meta: Sequence[dict], answers: Sequence[str] | None
) -> list[QAPrediction | PairPrediction]:
    """One prediction record per row (arg-max answer or class), carrying the row's label."""
    best = logits.detach().float().argmax(-1).tolist()
    if task == "nlvr2":
        return [
            PairPrediction(row["id"], bool(choice), bool(row["label"]) if row["labelled"] else None)
            for row, choice in zip(meta, best, strict=True)
        ]
    assert answers is not None
    records = []
    for row, choice in zip(meta, best, strict=True):
        # Shard labels are answer ids of the same table; the metric compares answer strings.
        label = {answers[int(i)]: s for i, s in row["answers"].items()} if row["labelled"] else None
        records.append(QAPrediction(row["id"], answers[choice], label, row.get("answer_type")))
    return records


def batch_predictions(task: str, logits: torch.Tensor, batch: dict, answers: Sequence[str] | None) -> list:
    return predictions_from_logits(task, logits, batch[META], answers)


def score(task: str, predictions: Sequence) -> dict:
    """The task's metrics over the labelled predictions, plus how many were unlabelled."""
    if task == "vqa":
        result = metrics.vqa_soft_accuracy(predictions)
    elif task == "gqa":
        result = metrics.gqa_accuracy(predictions)
    else:
        result = metrics.nlvr2_metrics(predictions)
    result["unlabelled"] = sum(1 for item in predictions if item.label is None)
    return result


def headline(task: str, result: dict) -> str:
    """A one-line summary of a metrics dict."""
    value = result.get(PRIMARY_METRIC[task], math.nan)
    text = f"{task} accuracy {100 * value:.2f}% on {result['count']} labelled examples"
    if task == "nlvr2":
        text += f", consistency {100 * result['consistency']:.2f}% over {result['sentences']} sentences"
    if task == "vqa" and result["per_answer_type"]:
        text += " (" + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["per_answer_type"].items()) + ")"
    return text
