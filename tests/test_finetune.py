"""Fine-tuning pieces in-process: answer-head transfer, task models, shard conversion with bad input,
the per-rank loader split, weight formats for --init, and evaluation's refusals."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain import batch as B
from lxtrain import convert
from lxtrain.data import finetune_shards
from lxtrain.data.obj36 import RegionFeatures, format_line
from lxtrain.downstream import weights
from lxtrain.downstream.data import META, build_loader
from lxtrain.downstream.models import (
    PAIR_LABELS,
    TARGETS,
    AnswerTableMismatch,
    FinetuneObjective,
    NLVR2Model,
    QAModel,
    transfer_answer_head,
)
from lxtrain.evaluate import EvaluationError, evaluate
from lxtrain.model import LxmertConfig, LxmertForPretraining
from lxtrain.model.heads import AnswerHead
from lxtrain.synthetic import finetuning as synthetic_tasks
from lxtrain.synthetic.pretraining import World

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def task_sets(tmp_path_factory) -> Path:
    """Small synthetic VQA/GQA/NLVR2 sets converted to shards."""
    out = tmp_path_factory.mktemp("tasks")
    config = synthetic_tasks.TaskSetConfig(
        out=out, images=24, sets=12, world=World(feature_dim=FEATURE_DIM, boxes=8, max_objects=4), shards=True
    )
    synthetic_tasks.generate(config)
    return out


def tiny_config(**overrides) -> LxmertConfig:
    return LxmertConfig.tiny(visual_feature_dim=FEATURE_DIM, **overrides)


# ------------------------------------------------------------------------------------------
# Answer-head transfer.


def test_answer_head_transfer_copies_shared_answers_and_zeroes_the_rest():
    config = tiny_config(num_qa_labels=4)
    torch.manual_seed(0)
    source = AnswerHead(config)
    torch.nn.init.normal_(source.classifier.bias)
    target = AnswerHead(config, num_answers=5)
    source_answers = ["yes", "no", "2", "red"]
    target_answers = ["Red", "two", "blue", "yes", "the no."]  # raw strings: matched after normalisation
    report = transfer_answer_head(source, source_answers, target, target_answers)

    assert (report.shared, report.total, report.examples_missing) == (4, 5, ["blue"])
    for target_row, source_row in ((0, 3), (1, 2), (3, 0), (4, 1)):
        assert torch.equal(target.classifier.weight[target_row], source.classifier.weight[source_row])
        assert target.classifier.bias[target_row] == source.classifier.bias[source_row]
    assert not target.classifier.weight[2].any() and target.classifier.bias[2] == 0
    for name in ("dense", "norm"):
        for key, value in getattr(source, name).state_dict().items():
            assert torch.equal(getattr(target, name).state_dict()[key], value)


def test_answer_head_transfer_refuses_a_table_that_does_not_fit_the_checkpoint_head():
    config = tiny_config(num_qa_labels=4)
    with pytest.raises(AnswerTableMismatch, match="3 answers but the checkpoint's QA head has 4 outputs"):
        transfer_answer_head(AnswerHead(config), ["yes", "no", "2"], AnswerHead(config, 2), ["yes", "no"])


def test_answer_head_transfer_without_a_pretraining_table_zeroes_every_row():
    config = tiny_config(num_qa_labels=4)
    target = AnswerHead(config, num_answers=3)
    report = transfer_answer_head(AnswerHead(config), None, target, ["a", "b", "c"])
    assert report.shared == 0 and not target.classifier.weight.any()


# ------------------------------------------------------------------------------------------
# Models and losses.


def _qa_batch(size: int, answers: int, objects: int = 5) -> dict:
    torch.manual_seed(1)
    targets = torch.zeros(size, answers)
    targets[torch.arange(size), torch.randint(0, answers, (size,))] = 1.0
    return {
        B.INPUT_IDS: torch.randint(1000, 2000, (size, 7)),
        B.ATTENTION_MASK: torch.ones(size, 7, dtype=torch.int64),
        B.TOKEN_TYPE_IDS: torch.zeros(size, 7, dtype=torch.int64),
        B.OBJECT_FEATURES: torch.rand(size, objects, FEATURE_DIM),
        B.OBJECT_BOXES: torch.rand(size, objects, 4),
        TARGETS: targets,
    }


def test_qa_loss_is_bce_times_the_number_of_answers():
    model = QAModel(tiny_config(), num_answers=6).eval()
    batch = _qa_batch(3, 6)
    output = FinetuneObjective(model, "vqa")(batch)
    logits = model(batch)
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(logits, batch[TARGETS], reduction="sum") / 3
    )
    assert torch.allclose(output.total, expected, atol=1e-5)
    assert output.logits.shape == (3, 6)


def test_nlvr2_model_encodes_each_image_with_the_sentence_and_concatenates_in_order():
    model = NLVR2Model(tiny_config()).eval()
    qa = _qa_batch(2, 1)
    batch = {key: qa[key] for key in B.MODEL_INPUT_KEYS[:3]}
    batch[B.OBJECT_FEATURES] = torch.rand(2, 2, 5, FEATURE_DIM)
    batch[B.OBJECT_BOXES] = torch.rand(2, 2, 5, 4)
    batch[PAIR_LABELS] = torch.tensor([1, -100])
    pooled = []
    for image in (0, 1):
        out = model.backbone(
            *(batch[k] for k in B.MODEL_INPUT_KEYS[:3]),
            batch[B.OBJECT_FEATURES][:, image],
            batch[B.OBJECT_BOXES][:, image],
        )
        pooled.append(out.pooled)
    expected = model.head(torch.cat(pooled, dim=-1))
    output = FinetuneObjective(model, "nlvr2")(batch)
    assert torch.allclose(output.logits, expected, atol=1e-5)
    # Only the labelled row counts; an all-unlabelled batch still gives a zero, differentiable loss.
    assert output.labelled == 1
    batch[PAIR_LABELS] = torch.tensor([-100, -100])
    empty = FinetuneObjective(model, "nlvr2")(batch)
    assert empty.total.item() == 0 and empty.total.requires_grad


# ------------------------------------------------------------------------------------------
# Conversion and bad input.


def _regions(img_id: str, boxes: int = 4, dim: int = FEATURE_DIM) -> RegionFeatures:
    rng = np.random.default_rng(zlib.crc32(img_id.encode()))
    return RegionFeatures(
        img_id=img_id,
        img_h=100,
        img_w=200,
        objects_id=np.zeros(boxes, np.int64),
        objects_conf=np.ones(boxes, np.float32),
        attrs_id=np.zeros(boxes, np.int64),
        attrs_conf=np.ones(boxes, np.float32),
        boxes=np.tile(np.array([[10, 20, 110, 60]], np.float32), (boxes, 1)),
        features=rng.random((boxes, dim), dtype=np.float32),
    )


def test_vqa_conversion_counts_bad_input_and_keeps_going(tmp_path):
    tsv = tmp_path / "feat_obj36.tsv"
    tsv.write_text(
        format_line(_regions("img1"))
        + format_line(_regions("img2"))
        + "garbage line\n"
        + format_line(_regions("img3", boxes=6))
    )
    (tmp_path / "ans2label.json").write_text(json.dumps({"yes": 0, "no": 1, "2": 2}))
    records = [
        {
            "question_id": 1,
            "img_id": "img1",
            "sent": "is it?",
            "label": {"yes": 1.0},
            "answer_type": "yes/no",
        },
        {"question_id": 2, "img_id": "img1", "sent": "how many?", "label": {"two": 1.0, "seven": 0.3}},
        {"question_id": 3, "img_id": "nowhere", "sent": "what?", "label": {"no": 1.0}},
        {"question_id": 4, "img_id": "img2", "sent": "and?", "label": {"maybe": 1.0}},
        {"img_id": "img2", "sent": "no id"},
        {"question_id": 6, "img_id": "img3", "sent": "other box count?", "label": {"no": 1.0}},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    index = finetune_shards.convert(
        finetune_shards.ConvertTaskConfig(
            task="vqa",
            json=[tmp_path / "train.json"],
            tsv=[tsv],
            out=tmp_path / "shards",
            answers=tmp_path / "ans2label.json",
        )
    )
    counts = index["dropped"]["counts"]
    assert counts == {"no_features": 1, "label_outside_table": 2, "bad_record": 1, "box_count": 1}
    assert index["totals"] == {"samples": 2, "examples": 3, "labelled": 3}
    assert any("nowhere" in m for m in index["dropped"]["first_messages"])

    opened = finetune_shards.open_finetune_index(tmp_path / "shards")
    sample = next(opened.iter_samples(0))
    assert sample.img_ids == ["img1"]
    assert [e["answer_ids"] for e in sample.examples] == [
        [0],
        [2],
    ]  # "two" normalised to "2", "seven" dropped
    assert np.allclose(sample.boxes[0][0], [0.05, 0.2, 0.55, 0.6])  # pixels / (w, h, w, h)


def test_nlvr2_conversion_pairs_two_images_and_drops_bad_labels(tmp_path):
    tsv = tmp_path / "nlvr2_obj36.tsv"
    tsv.write_text("".join(format_line(_regions(f"dev-1-{p}-img{k}")) for p in range(2) for k in range(2)))
    records = [
        {"identifier": "dev-1-0-0", "img0": "dev-1-0-img0", "img1": "dev-1-0-img1", "sent": "s", "label": 1},
        {
            "identifier": "dev-1-0-1",
            "img0": "dev-1-0-img0",
            "img1": "dev-1-0-img1",
            "sent": "t",
            "label": "False",
        },
        {"identifier": "dev-1-1-0", "img0": "dev-1-1-img0", "img1": "dev-1-1-img1", "sent": "s", "label": 5},
        {"identifier": "dev-1-2-0", "img0": "dev-1-2-img0", "img1": "dev-1-2-img1", "sent": "s", "label": 0},
    ]
    (tmp_path / "dev.json").write_text(json.dumps(records))
    index = finetune_shards.convert(
        finetune_shards.ConvertTaskConfig(
            task="nlvr2", json=[tmp_path / "dev.json"], tsv=[tsv], out=tmp_path / "shards"
        )
    )
    assert index["dropped"]["counts"] == {"label_outside_table": 1, "no_features": 1}
    sample = next(finetune_shards.open_finetune_index(tmp_path / "shards").iter_samples(0))
    assert sample.img_ids == ["dev-1-0-img0", "dev-1-0-img1"] and len(sample.features) == 2
    assert [(e["id"], e["label"]) for e in sample.examples] == [("dev-1-0-0", 1), ("dev-1-0-1", 0)]


def test_conversion_with_no_usable_example_is_a_clear_error(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"1": 0}))
    (tmp_path / "q.json").write_text(json.dumps([{"question_id": 1, "img_id": "x", "sent": "s"}]))
    (tmp_path / "f.tsv").write_text("")
    with pytest.raises(ValueError, match="no usable examples.*no_features"):
        finetune_shards.convert(
            finetune_shards.ConvertTaskConfig(
                task="vqa",
                json=[tmp_path / "q.json"],
                tsv=[tmp_path / "f.tsv"],
                out=tmp_path / "s",
                answers=tmp_path / "a.json",
            )
        )


# ------------------------------------------------------------------------------------------
# Loader.


def test_evaluation_split_covers_every_example_once_across_ranks_and_workers(task_sets):
    index = finetune_shards.open_finetune_index(task_sets / "shards" / "vqa_train")
    seen = []
    for rank in range(2):
        loader = build_loader(
            index, batch_size=5, rank=rank, world_size=2, num_workers=0, seed=0, train=False
        )
        batches = list(loader.epoch(0))
        assert len(batches) == len(loader)
        seen += [row["id"] for batch in batches for row in batch[META]]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == index.examples


def test_training_batches_are_full_equal_per_rank_and_resume_exactly(task_sets):
    index = finetune_shards.open_finetune_index(task_sets / "shards" / "nlvr2_train")
    loaders = [
        build_loader(index, batch_size=3, rank=r, world_size=2, num_workers=0, seed=5, train=True)
        for r in range(2)
    ]
    first = [list(loader.epoch(1)) for loader in loaders]
    assert len(first[0]) == len(first[1]) == len(loaders[0]) > 2
    batch = first[0][0]
    assert batch[B.OBJECT_FEATURES].shape == (3, 2, 8, FEATURE_DIM) and batch[PAIR_LABELS].shape == (3,)
    ids = [[row["id"] for b in rank for row in b[META]] for rank in first]
    assert not set(ids[0]) & set(ids[1])
    resumed = list(loaders[0].epoch(1, position=2))
    assert [[r["id"] for r in b[META]] for b in resumed] == [[r["id"] for r in b[META]] for b in first[0][2:]]
    assert ids[0] != [row["id"] for b in loaders[0].epoch(2) for row in b[META]]  # reshuffled per epoch


# ------------------------------------------------------------------------------------------
# --init formats.


@pytest.fixture(scope="module")
def pretrained_model() -> LxmertForPretraining:
    torch.manual_seed(3)
    return LxmertForPretraining(tiny_config(num_qa_labels=5))


def test_init_formats_are_detected_and_give_the_same_backbone(tmp_path, pretrained_model):
    state, config = pretrained_model.state_dict(), pretrained_model.config
    convert.write_lxtrain(state, config, tmp_path / "lx")
    convert.write_hf(state, config, tmp_path / "hf")
    convert.write_original(state, config, tmp_path / "model_LXRT.pth")
    for source, fmt in (
        (tmp_path / "lx", "lxtrain"),
        (tmp_path / "hf", "hf"),
        (tmp_path / "model_LXRT.pth", "original"),
    ):
        assert weights.detect_format(source) == fmt
        loaded = weights.load_pretrained(source, num_attention_heads=config.num_attention_heads)
        backbone = weights.backbone_state(loaded)
        assert all(torch.equal(backbone[k], v) for k, v in pretrained_model.backbone.state_dict().items())
    with pytest.raises(FileNotFoundError):
        weights.detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an lxtrain export"):
        weights.detect_format(tmp_path / "empty")


def test_pretrain_answer_table_comes_from_the_run_or_the_flag(tmp_path, pretrained_model):
    run = tmp_path / "run"
    convert.write_lxtrain(pretrained_model.state_dict(), pretrained_model.config, run / "export")
    shards = tmp_path / "pre_shards"
    shards.mkdir()
    (shards / "index.json").write_text(json.dumps({"answers": {"list": ["a", "b", "c", "d", "e"]}}))
    (run / "run_config.json").write_text(json.dumps({"lxtrain": {"train_shards": str(shards)}}))
    assert weights.load_pretrained(run / "export").answers == ["a", "b", "c", "d", "e"]
    (tmp_path / "all_ans.json").write_text(json.dumps([{"ans": x, "dsets": []} for x in "vwxyz"]))
    assert weights.load_pretrained(
        run / "export", pretrain_answers=str(tmp_path / "all_ans.json")
    ).answers == list("vwxyz")


# ------------------------------------------------------------------------------------------
# Evaluation refusals.


@pytest.fixture
def finetuned_vqa(tmp_path, task_sets) -> Path:
    answers = finetune_shards.open_finetune_index(task_sets / "shards" / "vqa_train").answers
    model = QAModel(tiny_config(), num_answers=len(answers))
    return weights.save_finetuned(model.state_dict(), model.config, "vqa", answers, tmp_path / "vqa_model")


def test_evaluate_scores_a_labelled_split_and_writes_predictions(tmp_path, task_sets, finetuned_vqa):
    result = evaluate(
        str(finetuned_vqa), str(task_sets / "shards" / "vqa_minival"), tmp_path / "eval", num_workers=0
    )
    assert result["metrics"]["count"] == result["examples"] > 0
    assert set(result["metrics"]["per_answer_type"]) <= {"yes/no", "number", "other"}
    rows = json.loads(Path(result["submission"]).read_text())
    assert len(rows) == result["examples"] and set(rows[0]) == {"question_id", "answer"}


def test_evaluate_gqa_and_nlvr2_write_their_own_formats(tmp_path, task_sets):
    shards = task_sets / "shards"
    answers = finetune_shards.open_finetune_index(shards / "gqa_train").answers
    qa = QAModel(tiny_config(), num_answers=len(answers))
    gqa = weights.save_finetuned(qa.state_dict(), qa.config, "gqa", answers, tmp_path / "gqa")
    result = evaluate(str(gqa), str(shards / "gqa_testdev"), tmp_path / "gqa_eval", num_workers=0)
    assert set(result["metrics"]) == {"accuracy", "count", "unlabelled"}
    rows = json.loads(Path(result["submission"]).read_text())
    assert all(
        set(row) == {"questionId", "prediction"} and isinstance(row["questionId"], str) for row in rows
    )
    pair = NLVR2Model(tiny_config())
    nlvr2 = weights.save_finetuned(pair.state_dict(), pair.config, "nlvr2", None, tmp_path / "nlvr2")
    result = evaluate(str(nlvr2), str(shards / "nlvr2_valid"), tmp_path / "nlvr2_eval", num_workers=0)
    assert result["metrics"]["count"] == result["examples"] and 0 <= result["metrics"]["consistency"] <= 1
    assert Path(result["submission"]).name == "nlvr2_predictions.csv"


def test_evaluate_on_a_test_split_writes_predictions_and_explains_missing_accuracy(
    tmp_path, task_sets, finetuned_vqa
):
    shards = str(task_sets / "shards" / "vqa_test")
    result = evaluate(str(finetuned_vqa), shards, tmp_path / "auto", num_workers=0)
    assert result["metrics"] is None and "has no labels" in result["note"]
    assert (tmp_path / "auto" / "vqa_submission.json").exists()
    with pytest.raises(EvaluationError, match="no labels .* accuracy cannot be computed"):
        evaluate(str(finetuned_vqa), shards, tmp_path / "required", num_workers=0, require_metrics=True)
    assert (tmp_path / "required" / "vqa_submission.json").exists()  # predictions are still written


def test_evaluate_refuses_an_answer_table_that_does_not_match_the_model(tmp_path, task_sets):
    answers = ["yes", "no"]
    model = QAModel(tiny_config(), num_answers=2)
    path = weights.save_finetuned(model.state_dict(), model.config, "vqa", answers, tmp_path / "other")
    with pytest.raises(AnswerTableMismatch, match="answer table of .* answers, but .* head has 2"):
        evaluate(str(path), str(task_sets / "shards" / "vqa_minival"), tmp_path / "x", num_workers=0)
    with pytest.raises(EvaluationError, match="holds nlvr2 data but .* is a vqa model"):
        evaluate(str(path), str(task_sets / "shards" / "nlvr2_valid"), tmp_path / "y", num_workers=0)


# ------------------------------------------------------------------------------------------
# The entry point's checks, before any compute.


def _config(tmp_path: Path, shards: Path, train: str, valid: str | None, task: str = "vqa"):
    from lxtrain.downstream.config import parse_args

    # The flags slurm/pretrain.sbatch passes (LXTRAIN_SCRIPT=lxtrain/finetune.py) plus the task's own.
    argv = [
        "--output-dir",
        str(tmp_path / "run"),
        "--resume",
        "auto",
        "--deepspeed_config",
        str(Path(__file__).parent.parent / "ds_configs" / "cpu_finetune.json"),
        "--train-shards",
        str(shards / train),
        "--task",
        task,
        "--init",
        str(tmp_path),
    ]
    return parse_args(argv + (["--valid-shards", str(shards / valid)] if valid else []))


def test_training_and_validation_splits_must_be_labelled_and_agree(tmp_path, task_sets):
    from lxtrain.downstream.finetuning import open_splits

    shards = task_sets / "shards"
    train, valid = open_splits(_config(tmp_path, shards, "vqa_train", "vqa_minival"))
    assert train.fully_labelled and valid.answers == train.answers
    with pytest.raises(ValueError, match="have no label .*training needs a labelled split"):
        open_splits(_config(tmp_path, shards, "vqa_test", None))
    with pytest.raises(ValueError, match="has no labels .*validation needs labels"):
        open_splits(_config(tmp_path, shards, "vqa_train", "vqa_test"))
    with pytest.raises(ValueError, match="holds gqa data, not vqa"):
        open_splits(_config(tmp_path, shards, "gqa_train", None))
    with pytest.raises(ValueError, match="--task 'coco' is not one of"):
        _config(tmp_path, shards, "vqa_train", None, task="coco")
