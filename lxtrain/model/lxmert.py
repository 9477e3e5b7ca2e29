"""The LXMERT network, top to bottom in the order of the paper's Figure 1.

Shape legend: B batch, T tokens, O objects, D hidden, Fv RoI feature dim, V vocabulary.
Single-device code: parallelism, precision and optimisation live in the training engine.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lxtrain.model.attention import padding_bias, set_attention_backend
from lxtrain.model.config import LxmertConfig
from lxtrain.model.heads import AnswerHead, MaskedLMHead, ObjectHead
from lxtrain.model.layers import CrossModalityLayer, ObjectEmbeddings, TextEmbeddings, TransformerLayer


@dataclasses.dataclass
class BackboneOutput:
    language: torch.Tensor  # (B, T, D) language output of the last cross-modality layer
    objects: torch.Tensor  # (B, O, D) vision output of the last cross-modality layer
    pooled: torch.Tensor  # (B, D) tanh(W h_[CLS]): the cross-modality output


@dataclasses.dataclass
class PretrainingLogits:
    """Every head evaluated densely (all tokens, all boxes): for inference, parity and inspection."""

    backbone: BackboneOutput
    mlm: torch.Tensor  # (B, T, V)
    matched: torch.Tensor  # (B, 2)
    objects: torch.Tensor  # (B, O, num_object_labels)
    attributes: torch.Tensor  # (B, O, num_attribute_labels)
    features: torch.Tensor  # (B, O, Fv)
    answers: torch.Tensor  # (B, num_qa_labels)


def _check_inputs(
    config: LxmertConfig, input_ids: torch.Tensor, features: torch.Tensor, boxes: torch.Tensor
) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T); got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens; max_position_embeddings is "
            f"{config.max_position_embeddings}"
        )
    if features.dim() != 3 or features.shape[-1] != config.visual_feature_dim:
        raise ValueError(
            f"object_features must be (B, O, visual_feature_dim={config.visual_feature_dim}); "
            f"got shape {tuple(features.shape)}"
        )
    if boxes.shape != (*features.shape[:2], config.visual_position_dim):
        raise ValueError(
            f"object_boxes must be (B, O, {config.visual_position_dim}) = "
            f"{(*features.shape[:2], config.visual_position_dim)} to match object_features; "
            f"got {tuple(boxes.shape)}"
        )
    if features.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"batch sizes differ: input_ids has {input_ids.shape[0]} rows, object_features {features.shape[0]}"
        )


class LxmertBackbone(nn.Module):
    """Embeddings -> language layers -> object-relationship layers -> cross-modality layers -> pooler."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = config
        self.text_embeddings = TextEmbeddings(config)
        self.object_embeddings = ObjectEmbeddings(config)
        self.language_layers = nn.ModuleList(
            TransformerLayer(config) for _ in range(config.num_language_layers)
        )
        self.object_layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_object_layers))
        self.cross_layers = nn.ModuleList(CrossModalityLayer(config) for _ in range(config.num_cross_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        # The backend is settled here, once per model (LXTRAIN_ATTENTION read now, never per forward).
        set_attention_backend(self, config.attention_backend)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        object_features: torch.Tensor,
        object_boxes: torch.Tensor,
    ) -> BackboneOutput:
        _check_inputs(self.config, input_ids, object_features, object_boxes)
        language = self.text_embeddings(input_ids, token_type_ids)  # (B, T, D)
        objects = self.object_embeddings(object_features, object_boxes)  # (B, O, D)
        language_bias = padding_bias(attention_mask, language.dtype)  # (B, 1, 1, T)
        object_bias = None  # every image has all O real boxes: nothing to mask (SPEC 2)

        for layer in self.language_layers:
            language = layer(language, language_bias)
        for layer in self.object_layers:
            objects = layer(objects, object_bias)
        for layer in self.cross_layers:
            language, objects = layer(language, objects, language_bias, object_bias)

        pooled = torch.tanh(self.pooler(language[:, 0]))  # (B, D)
        return BackboneOutput(language=language, objects=objects, pooled=pooled)


class LxmertForPretraining(nn.Module):
    """The backbone plus the five pre-training heads (MLM, matching, object obj/attr/feat, QA)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = LxmertBackbone(config)
        self.mlm_head = MaskedLMHead(config)
        self.matching_head = nn.Linear(config.hidden_size, 2)
        self.object_head = ObjectHead(config)
        self.answer_head = AnswerHead(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The (V, D) table the MLM decoder is tied to."""
        return self.backbone.text_embeddings.word.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        object_features: torch.Tensor,
        object_boxes: torch.Tensor,
    ) -> PretrainingLogits:
        """All heads, densely. Training uses ``lxtrain.tasks.objectives``, which evaluates heads sparsely."""
        out = self.backbone(input_ids, attention_mask, token_type_ids, object_features, object_boxes)
        object_hidden = self.object_head.transform(out.objects)
        return PretrainingLogits(
            backbone=out,
            mlm=self.mlm_head(out.language, self.word_embeddings),
            matched=self.matching_head(out.pooled),
            objects=self.object_head.object_classifier(object_hidden),
            attributes=self.object_head.attribute_classifier(object_hidden),
            features=self.object_head.feature_regressor(object_hidden),
            answers=self.answer_head(out.pooled),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
