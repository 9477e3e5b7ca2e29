"""Pre-training objectives checked against explicit formulas on a tiny batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_batch

from lxtrain import batch as B
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.masking import IGNORE_INDEX
from lxtrain.tasks.objectives import (
    HF_VISUAL_LOSS_NORMALIZER,
    TASKS,
    pretraining_objectives,
)

ALL_TASKS = dict.fromkeys(TASKS, 1.0)


def _dense_logits(model: LxmertForPretraining, batch: dict[str, torch.Tensor]):
    return model(*(batch[key] for key in B.MODEL_INPUT_KEYS))


def _log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over rows whose label is not IGNORE_INDEX."""
    keep = labels != IGNORE_INDEX
    log_probs = _log_softmax_by_hand(logits[keep])
    return -log_probs[torch.arange(int(keep.sum())), labels[keep]].mean()


def test_every_loss_matches_its_formula(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.eval()  # no dropout: the dense pass and the objectives see the same network
    batch = build_batch(model.config, batch_size=4, seq_len=10, num_objects=5, seed=3)
    with torch.no_grad():
        out = pretraining_objectives(model, batch, ALL_TASKS)
        logits = _dense_logits(model, batch)

    num_boxes = 4 * 5
    normalizer = 1 / 0.15
    expected = {
        "mlm": _mean_nll(logits.mlm.flatten(0, 1), batch[B.MLM_LABELS].flatten()),
        "match": _mean_nll(logits.matched, batch[B.MATCHED_LABELS]),
        "qa": _mean_nll(logits.answers, batch[B.QA_LABELS]),
    }
    # obj / attr: confidence-weighted cross-entropy summed over *all* boxes, divided by B*O.
    for task, logit, label_key, conf_key in (
        ("obj", logits.objects, B.OBJECT_LABELS, B.OBJECT_CONFIDENCES),
        ("attr", logits.attributes, B.ATTRIBUTE_LABELS, B.ATTRIBUTE_CONFIDENCES),
    ):
        log_probs = _log_softmax_by_hand(logit)
        nll = -log_probs.gather(-1, batch[label_key][..., None])[..., 0]  # (B, O)
        expected[task] = (nll * batch[conf_key]).sum() / num_boxes * normalizer
    # feat: Smooth-L1 (beta 1) averaged over the feature dim, on masked boxes only, divided by B*O.
    diff = (logits.features - batch[B.FEATURE_TARGETS]).abs()
    smooth_l1 = torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean(-1)  # (B, O)
    expected["feat"] = (smooth_l1 * batch[B.OBJECT_MASK]).sum() / num_boxes * normalizer

    assert set(out.losses) == set(TASKS)
    for task in TASKS:
        torch.testing.assert_close(out.losses[task], expected[task], rtol=1e-5, atol=1e-6, msg=task)
    # The batch really exercises the selections: some unmasked boxes, some unlabelled QA rows.
    assert 0 < batch[B.OBJECT_MASK].sum() < num_boxes
    assert (batch[B.QA_LABELS] == IGNORE_INDEX).any()


def test_hf_normaliser_only_rescales_the_visual_losses(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.eval()
    batch = build_batch(model.config)
    with torch.no_grad():
        release = pretraining_objectives(model, batch, ALL_TASKS).losses
        hf = pretraining_objectives(
            model, batch, ALL_TASKS, visual_loss_normalizer=HF_VISUAL_LOSS_NORMALIZER
        ).losses
    for task in ("obj", "attr", "feat"):
        torch.testing.assert_close(hf[task], release[task] * 0.15 * HF_VISUAL_LOSS_NORMALIZER)
    for task in ("mlm", "match", "qa"):
        assert torch.equal(hf[task], release[task])


def test_sparse_mlm_loss_and_gradient_equal_the_dense_head(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.eval()
    batch = build_batch(model.config, seed=5)

    sparse = pretraining_objectives(model, batch, {"mlm": 1.0}).losses["mlm"]
    sparse.backward()
    sparse_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    dense_logits = _dense_logits(model, batch).mlm  # (B, T, V): every position through the decoder
    dense = F.cross_entropy(
        dense_logits.flatten(0, 1), batch[B.MLM_LABELS].flatten(), ignore_index=IGNORE_INDEX
    )
    dense.backward()

    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    for name in ("mlm_head.bias", "mlm_head.dense.weight", "backbone.text_embeddings.word.weight"):
        dense_grad = model.get_parameter(name).grad
        # Summation order differs (N vs B*T rows), so compare relative to the gradient's scale.
        scale = dense_grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(sparse_grads[name], dense_grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_tasks_without_labels_give_zero_and_still_touch_their_heads(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.train()
    batch = build_batch(model.config, qa_rows=0)
    batch[B.MLM_LABELS] = torch.full_like(batch[B.MLM_LABELS], IGNORE_INDEX)  # no masked word
    batch[B.OBJECT_MASK] = torch.zeros_like(batch[B.OBJECT_MASK])  # no masked box

    out = pretraining_objectives(model, batch, ALL_TASKS)
    for task in ("mlm", "qa", "feat"):
        assert out.losses[task].item() == 0.0, f"{task} without labels must be exactly 0 (not NaN)"
    assert torch.isfinite(out.total)
    out.total.backward()

    # Every parameter takes part in the graph, so distributed gradient reduction sees the same set
    # on every rank; the heads of the empty tasks get exact zeros.
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad}"
    for prefix in ("mlm_head.", "answer_head.", "object_head.feature_regressor."):
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                assert torch.count_nonzero(p.grad) == 0, name
    assert out.counts["mlm"] == 0 and out.counts["qa"] == 0
    assert "mlm" not in out.accuracies() and "qa" not in out.accuracies()


def test_weighted_total_and_inactive_tasks(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.eval()
    batch = build_batch(model.config)
    weights = {"mlm": 1.0, "match": 0.5, "obj": 2.0, "feat": 0.25, "qa": 3.0}  # attr inactive
    with torch.no_grad():
        out = pretraining_objectives(model, batch, weights)
    assert set(out.losses) == set(weights)
    expected = sum(weights[task] * out.losses[task] for task in weights)
    torch.testing.assert_close(out.total, expected)
    assert not torch.allclose(out.total, sum(out.losses.values()))  # the weights really apply


def test_accuracy_counts(tiny_model: LxmertForPretraining) -> None:
    model = tiny_model.eval()
    batch = build_batch(model.config, seed=7)
    with torch.no_grad():
        out = pretraining_objectives(model, batch, ALL_TASKS)
        logits = _dense_logits(model, batch)

    def count(prediction: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        keep = labels != IGNORE_INDEX
        return int((prediction.argmax(-1)[keep] == labels[keep]).sum()), int(keep.sum())

    expected = {
        "mlm": count(logits.mlm, batch[B.MLM_LABELS]),
        "match": count(logits.matched, batch[B.MATCHED_LABELS]),
        "qa": count(logits.answers, batch[B.QA_LABELS]),
        "obj": count(logits.objects, batch[B.OBJECT_LABELS]),
    }
    for task, (correct, total) in expected.items():
        assert (int(out.correct[task]), int(out.counts[task])) == (correct, total), task
        assert out.accuracies()[task] == pytest.approx(correct / total)
    assert int(out.counts["obj"]) == batch[B.OBJECT_LABELS].numel()


def test_unknown_task_is_refused(tiny_model: LxmertForPretraining) -> None:
    batch = build_batch(tiny_model.config)
    with pytest.raises(ValueError, match=r"unknown pre-training task.*'vqa'.*known tasks"):
        pretraining_objectives(tiny_model, batch, {"mlm": 1.0, "vqa": 1.0})
