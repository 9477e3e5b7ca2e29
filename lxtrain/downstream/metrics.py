"""Task metrics (SPEC 4), as pure functions of predictions and labels.

- VQA: soft accuracy, the mean over questions of the label's score for the predicted answer
  (the published labels already hold min(1, 0.3 x annotators who gave it)); overall and per
  answer type.
- GQA: accuracy; the labels are one-hot, so the same score lookup gives exact-match accuracy.
- NLVR2: accuracy, and consistency: the share of unique sentences for which every image pair
  is classified correctly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class QAPrediction:
    """One VQA/GQA question: the predicted answer string, its label ({answer: score}), its type."""

    question_id: int | str
    answer: str
    label: Mapping[str, float] | None
    answer_type: str | None = None


@dataclass(frozen=True)
class PairPrediction:
    """One NLVR2 example: its identifier, the predicted truth value and the label (None: unlabelled)."""

    identifier: str
    prediction: bool
    label: bool | None


def vqa_soft_accuracy(predictions: Iterable[QAPrediction]) -> dict:
    """{"accuracy", "per_answer_type": {type: accuracy}, "count"} over labelled questions."""
    total, count = 0.0, 0
    by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for item in predictions:
        if item.label is None:
            continue
        score = float(item.label.get(item.answer, 0.0))
        total, count = total + score, count + 1
        if item.answer_type is not None:
            by_type[item.answer_type][0] += score
            by_type[item.answer_type][1] += 1
    return {
        "accuracy": total / count if count else float("nan"),
        "per_answer_type": {kind: s / n for kind, (s, n) in sorted(by_type.items())},
        "count": count,
    }


def gqa_accuracy(predictions: Iterable[QAPrediction]) -> dict:
    """{"accuracy", "count"}: a prediction is right when the (one-hot) label gives it a score > 0."""
    labelled = [item for item in predictions if item.label is not None]
    correct = sum(1 for item in labelled if item.label.get(item.answer, 0.0) > 0)
    return {"accuracy": correct / len(labelled) if labelled else float("nan"), "count": len(labelled)}


def nlvr2_sentence_key(identifier: str) -> str:
    """The unique sentence an NLVR2 example belongs to.

    Identifiers are ``split-set-pair-sentence`` ("dev-850-2-0"): the same statement of a set is
    shown with several image pairs, so dropping the pair number groups them.
    """
    parts = identifier.split("-")
    if len(parts) < 4:
        return identifier
    return "-".join([*parts[:-2], parts[-1]])


def nlvr2_metrics(predictions: Iterable[PairPrediction]) -> dict:
    """{"accuracy", "consistency", "count", "sentences"} over labelled examples."""
    correct, count = 0, 0
    all_right: dict[str, bool] = {}
    for item in predictions:
        if item.label is None:
            continue
        right = bool(item.prediction) == bool(item.label)
        correct, count = correct + right, count + 1
        key = nlvr2_sentence_key(item.identifier)
        all_right[key] = all_right.get(key, True) and right
    return {
        "accuracy": correct / count if count else float("nan"),
        "consistency": sum(all_right.values()) / len(all_right) if all_right else float("nan"),
        "count": count,
        "sentences": len(all_right),
    }
