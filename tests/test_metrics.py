"""Task metrics on hand-made cases, and the submission files in their exact formats."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lxtrain.downstream import metrics, submission
from lxtrain.downstream.metrics import PairPrediction, QAPrediction


def test_vqa_soft_accuracy_uses_the_label_score_of_the_predicted_answer():
    predictions = [
        QAPrediction(1, "2", {"2": 1.0, "3": 0.3}, "number"),  # full credit
        QAPrediction(2, "3", {"2": 1.0, "3": 0.3}, "number"),  # 0.3: one annotator in three agreed
        QAPrediction(3, "no", {"yes": 1.0}, "yes/no"),  # wrong
        QAPrediction(4, "red", {"red": 0.6, "dark red": 1.0}, "other"),
        QAPrediction(5, "blue", None, "other"),  # unlabelled: not scored
    ]
    result = metrics.vqa_soft_accuracy(predictions)
    assert result["count"] == 4
    assert result["accuracy"] == pytest.approx((1.0 + 0.3 + 0.0 + 0.6) / 4)
    assert result["per_answer_type"] == pytest.approx({"number": 0.65, "yes/no": 0.0, "other": 0.6})


def test_gqa_accuracy_is_exact_match_against_one_hot_labels():
    predictions = [
        QAPrediction("a", "left", {"left": 1.0}),
        QAPrediction("b", "yes", {"no": 1.0}),
        QAPrediction("c", "table", {"table": 1.0}),
        QAPrediction("d", "no", None),
    ]
    assert metrics.gqa_accuracy(predictions) == {"accuracy": pytest.approx(2 / 3), "count": 3}


def test_nlvr2_sentence_key_drops_the_pair_number():
    assert metrics.nlvr2_sentence_key("dev-850-2-0") == "dev-850-0"
    assert metrics.nlvr2_sentence_key("test1-12-0-3") == "test1-12-3"
    assert metrics.nlvr2_sentence_key("odd") == "odd"


def test_nlvr2_consistency_counts_sentences_with_every_pair_right():
    truth = {  # identifier -> (prediction, label)
        "dev-1-0-0": (True, True),
        "dev-1-1-0": (False, False),
        "dev-1-2-0": (True, True),  # sentence 1-0: all right
        "dev-2-0-0": (True, True),
        "dev-2-1-0": (True, False),  # sentence 2-0: one pair wrong
        "dev-2-0-1": (False, False),  # sentence 2-1 (another statement of set 2): right
    }
    predictions = [PairPrediction(i, p, label) for i, (p, label) in truth.items()]
    predictions.append(PairPrediction("test-9-0-0", True, None))  # unlabelled: ignored
    result = metrics.nlvr2_metrics(predictions)
    assert result["count"] == 6 and result["sentences"] == 3
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["consistency"] == pytest.approx(2 / 3)


def test_metrics_without_labels_are_nan_not_errors():
    assert math.isnan(metrics.vqa_soft_accuracy([QAPrediction(1, "a", None)])["accuracy"])
    assert math.isnan(metrics.nlvr2_metrics([])["consistency"])


def test_vqa_submission_format(tmp_path):
    path = submission.write_submission(
        "vqa", tmp_path, [QAPrediction(7, "yes", None), QAPrediction(8, "2", {"2": 1.0})]
    )
    assert path.name == "vqa_submission.json"
    rows = json.loads(path.read_text())
    assert rows == [{"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "2"}]
    assert all(type(row["question_id"]) is int for row in rows)


def test_gqa_submission_format(tmp_path):
    path = submission.write_submission("gqa", tmp_path, [QAPrediction("201307251", "left", None)])
    assert json.loads(path.read_text()) == [{"questionId": "201307251", "prediction": "left"}]


def test_nlvr2_submission_format(tmp_path):
    predictions = [PairPrediction("test1-0-1-0", True, None), PairPrediction("test1-0-2-0", False, None)]
    path = submission.write_submission("nlvr2", tmp_path, predictions)
    assert path.read_text() == "test1-0-1-0,True\ntest1-0-2-0,False\n"
    assert list(csv.reader(path.open())) == [["test1-0-1-0", "True"], ["test1-0-2-0", "False"]]
