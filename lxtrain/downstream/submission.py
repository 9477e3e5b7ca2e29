"""Prediction files in each task's official submission format.

- VQA (EvalAI): JSON ``[{"question_id": int, "answer": str}, ...]``
- GQA: JSON ``[{"questionId": str, "prediction": str}, ...]``
- NLVR2: CSV, one ``identifier,True|False`` line per example, no header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from lxtrain.downstream.metrics import PairPrediction, QAPrediction

FILE_NAMES = {"vqa": "vqa_submission.json", "gqa": "gqa_submission.json", "nlvr2": "nlvr2_predictions.csv"}


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def write_vqa(path: str | Path, predictions: Iterable[QAPrediction]) -> Path:
    rows = [{"question_id": int(item.question_id), "answer": item.answer} for item in predictions]
    return _atomic_write(Path(path), json.dumps(rows))


def write_gqa(path: str | Path, predictions: Iterable[QAPrediction]) -> Path:
    rows = [{"questionId": str(item.question_id), "prediction": item.answer} for item in predictions]
    return _atomic_write(Path(path), json.dumps(rows))


def write_nlvr2(path: str | Path, predictions: Iterable[PairPrediction]) -> Path:
    lines = [f"{item.identifier},{bool(item.prediction)}\n" for item in predictions]
    return _atomic_write(Path(path), "".join(lines))


WRITERS = {"vqa": write_vqa, "gqa": write_gqa, "nlvr2": write_nlvr2}


def write_submission(task: str, directory: str | Path, predictions: list) -> Path:
    """Write ``predictions`` of ``task`` under its standard file name in ``directory``."""
    return WRITERS[task](Path(directory) / FILE_NAMES[task], predictions)
