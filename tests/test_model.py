"""The LXMERT network: parity with HF transformers, attention backends, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_batch

from lxtrain import batch as B
from lxtrain import convert
from lxtrain.model import attention as attention_module
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.objectives import HF_VISUAL_LOSS_NORMALIZER, TASKS, pretraining_objectives

PARITY_ATOL = 1e-5


def _lxtrain_logits(model: LxmertForPretraining, batch: dict[str, torch.Tensor]):
    return model(*(batch[key] for key in B.MODEL_INPUT_KEYS))


def _assert_close(name: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float = PARITY_ATOL) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
    error = (ours - theirs).abs().max().item()
    assert error <= atol, f"{name}: max abs difference to HF {error:.3g} > {atol}"


def check_parity(hf, model: LxmertForPretraining, batch: dict[str, torch.Tensor]) -> None:
    """Every output and logit within PARITY_ATOL of HF, and the summed losses equal to HF's total."""
    with torch.no_grad():
        ours = _lxtrain_logits(model, batch)
        hf_backbone = hf.lxmert(**convert.hf_model_inputs(batch))
        hf_heads = hf(**convert.hf_model_inputs(batch))
        hf_visual = hf.obj_predict_head(hf_backbone.vision_output)

        _assert_close("language output", ours.backbone.language, hf_backbone.language_output)
        _assert_close("vision output", ours.backbone.objects, hf_backbone.vision_output)
        _assert_close("pooled output", ours.backbone.pooled, hf_backbone.pooled_output)
        _assert_close("mlm logits", ours.mlm, hf_heads.prediction_logits)
        _assert_close("matching logits", ours.matched, hf_heads.cross_relationship_score)
        _assert_close("qa logits", ours.answers, hf_heads.question_answering_score)
        _assert_close("obj logits", ours.objects, hf_visual["obj"])
        _assert_close("attr logits", ours.attributes, hf_visual["attr"])
        _assert_close("feat predictions", ours.features, hf_visual["feat"])

        weights = dict.fromkeys(TASKS, 1.0)
        objectives = pretraining_objectives(
            model, batch, weights, visual_loss_normalizer=HF_VISUAL_LOSS_NORMALIZER
        )
        labels = convert.hf_pretraining_labels(batch)
        hf_total = hf(**convert.hf_model_inputs(batch), **labels).loss
        # HF only reports a total; passing one target at a time isolates each of its terms.
        hf_mlm = hf(**convert.hf_model_inputs(batch), labels=labels["labels"]).loss
        hf_match = hf(**convert.hf_model_inputs(batch), matched_label=labels["matched_label"]).loss
        hf_qa = hf(**convert.hf_model_inputs(batch), ans=labels["ans"]).loss
        hf_visual_total = hf(**convert.hf_model_inputs(batch), obj_labels=labels["obj_labels"]).loss

    losses = objectives.losses
    assert set(losses) == set(TASKS)
    torch.testing.assert_close(losses["mlm"], hf_mlm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["match"], hf_match, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["qa"], hf_qa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        losses["obj"] + losses["attr"] + losses["feat"], hf_visual_total, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(sum(losses.values()), hf_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(objectives.total, hf_total, rtol=1e-5, atol=1e-6)


def test_parity_with_hf_tiny(hf_pair, tiny_config: LxmertConfig) -> None:
    hf, model, _ = hf_pair(tiny_config)
    batch = build_batch(tiny_config, batch_size=4, seq_len=12, num_objects=6)
    assert (batch[B.ATTENTION_MASK] == 0).any(), "the parity batch must contain padding"
    check_parity(hf, model, batch)


def test_parity_with_hf_deeper_stacks(hf_pair) -> None:
    # Two layers per stack: catches a layer wired to the wrong input (e.g. stacks swapped).
    config = LxmertConfig.tiny(num_language_layers=2, num_object_layers=2, num_cross_layers=2)
    hf, model, _ = hf_pair(config, seed=1)
    check_parity(hf, model, build_batch(config, batch_size=3, seq_len=9, num_objects=5, seed=1))


def test_parity_catches_a_perturbed_weight(hf_pair, tiny_config: LxmertConfig) -> None:
    # The parity check must be able to fail: one changed cross-attention weight is noticed.
    hf, model, _ = hf_pair(tiny_config)
    with torch.no_grad():
        model.backbone.cross_layers[0].cross_attention.attention.key.weight[0, 0] += 0.5
    with pytest.raises(AssertionError, match="output"):
        check_parity(hf, model, build_batch(tiny_config))


@pytest.mark.slow
def test_parity_with_hf_full_size(hf_pair) -> None:
    config = LxmertConfig()
    hf, model, _ = hf_pair(config)
    assert 225e6 < model.num_parameters() < 232e6  # LXMERT-base, ~228M (the MLM decoder is tied)
    check_parity(hf, model, build_batch(config, batch_size=2, seq_len=20, num_objects=36))


def test_cross_attention_is_shared_between_directions(tiny_model: LxmertForPretraining) -> None:
    layer = tiny_model.backbone.cross_layers[0]
    names = [name for name, _ in layer.named_parameters()]
    assert not any("language_cross" in n or "object_cross" in n or "visual_cross" in n for n in names)
    # Changing the one cross-attention block changes both modalities' outputs.
    batch = build_batch(tiny_model.config)
    tiny_model.eval()
    with torch.no_grad():
        before = tiny_model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))
        layer.cross_attention.output.weight[0] += 0.1  # one output unit: survives the LayerNorm
        after = tiny_model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))
    assert not torch.allclose(before.language, after.language)
    assert not torch.allclose(before.objects, after.objects)


# ---------------------------------------------------------------------------------------------
# Attention backends.


def _backbone_outputs(model: LxmertForPretraining, batch: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model.backbone(*(batch[key] for key in B.MODEL_INPUT_KEYS))


def _count_sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap PyTorch's SDPA as the attention module sees it; returns the list each call appends to."""
    calls: list[int] = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    return calls


def test_eager_and_sdpa_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(LxmertConfig.tiny()).eval()
    batch = build_batch(model.config)
    calls = _count_sdpa_calls(monkeypatch)
    attention_module.set_attention_backend(model, "eager")
    eager = _backbone_outputs(model, batch)
    assert not calls
    attention_module.set_attention_backend(model, "sdpa")
    sdpa = _backbone_outputs(model, batch)
    assert calls, "the sdpa backend must really run SDPA"
    for name in ("language", "objects", "pooled"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), rtol=0, atol=1e-6)


def test_env_override_selects_the_backend_when_the_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    config = LxmertConfig.tiny(attention_backend="eager")
    batch = build_batch(config)
    calls = _count_sdpa_calls(monkeypatch)
    monkeypatch.delenv(attention_module.ENV_OVERRIDE, raising=False)
    model = LxmertForPretraining(config).eval()
    _backbone_outputs(model, batch)
    assert not calls, "the configured eager backend must not call SDPA"

    monkeypatch.setenv(attention_module.ENV_OVERRIDE, "sdpa")
    _backbone_outputs(model, batch)
    assert not calls, "the override is read when the model is built, not per forward"
    model = LxmertForPretraining(config).eval()
    _backbone_outputs(model, batch)
    # 1 language + 1 object self-attention + (2 cross + 2 self) in the cross layer.
    assert len(calls) == 6

    assert attention_module.choose_backend("sdpa") == "sdpa"  # the override agrees
    monkeypatch.setenv(attention_module.ENV_OVERRIDE, "eager")
    assert attention_module.choose_backend("sdpa") == "eager"
    monkeypatch.setenv(attention_module.ENV_OVERRIDE, "")  # empty: not set
    assert attention_module.choose_backend("sdpa") == "sdpa"
    monkeypatch.delenv(attention_module.ENV_OVERRIDE)
    assert attention_module.resolve_backend("auto") == "sdpa"


def test_unknown_or_unavailable_backend_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="attention_backend.*'flash3'"):
        LxmertConfig.tiny(attention_backend="flash3")

    batch = build_batch(LxmertConfig.tiny())
    monkeypatch.setenv(attention_module.ENV_OVERRIDE, "flash3")
    with pytest.raises(ValueError, match="'flash3'.*LXTRAIN_ATTENTION"):
        LxmertForPretraining(LxmertConfig.tiny())
    monkeypatch.setenv(attention_module.ENV_OVERRIDE, "fused")
    model = LxmertForPretraining(LxmertConfig.tiny()).eval()
    with pytest.raises(RuntimeError, match="'fused'.*not available"):
        _backbone_outputs(model, batch)
    monkeypatch.delenv(attention_module.ENV_OVERRIDE)
    with pytest.raises(RuntimeError, match="'fused'"):
        _backbone_outputs(LxmertForPretraining(LxmertConfig.tiny(attention_backend="fused")), batch)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_wrong_feature_dim_names_field_expected_and_found(tiny_model: LxmertForPretraining) -> None:
    batch = build_batch(tiny_model.config, batch_size=2, num_objects=6)
    expected_dim = tiny_model.config.visual_feature_dim
    batch[B.OBJECT_FEATURES] = torch.zeros(2, 6, expected_dim + 1)
    with pytest.raises(
        ValueError, match=rf"object_features.*visual_feature_dim={expected_dim}.*\(2, 6, 65\)"
    ):
        _lxtrain_logits(tiny_model, batch)
    with pytest.raises(ValueError, match="object_features"):
        pretraining_objectives(tiny_model, batch, {"mlm": 1.0})


def test_wrong_box_shape_names_field_expected_and_found(tiny_model: LxmertForPretraining) -> None:
    batch = build_batch(tiny_model.config, batch_size=2, num_objects=6)
    batch[B.OBJECT_BOXES] = torch.zeros(2, 6, 5)
    with pytest.raises(ValueError, match=r"object_boxes.*\(2, 6, 4\).*\(2, 6, 5\)"):
        _lxtrain_logits(tiny_model, batch)
    batch[B.OBJECT_BOXES] = torch.zeros(2, 5, 4)  # one box per image too few for the features
    with pytest.raises(ValueError, match=r"object_boxes.*\(2, 6, 4\).*\(2, 5, 4\)"):
        _lxtrain_logits(tiny_model, batch)


def test_mismatched_batch_and_overlong_input_are_refused(tiny_model: LxmertForPretraining) -> None:
    batch = build_batch(tiny_model.config, batch_size=2, num_objects=6)
    batch[B.OBJECT_FEATURES] = batch[B.OBJECT_FEATURES][:1]
    batch[B.OBJECT_BOXES] = batch[B.OBJECT_BOXES][:1]
    with pytest.raises(ValueError, match="batch sizes differ"):
        _lxtrain_logits(tiny_model, batch)
    too_long = tiny_model.config.max_position_embeddings + 1
    with pytest.raises(ValueError, match=f"{too_long} tokens"):
        tiny_model.backbone(
            torch.ones(1, too_long, dtype=torch.long), None, None, torch.zeros(1, 2, 64), torch.zeros(1, 2, 4)
        )
