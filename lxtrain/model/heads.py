"""Prediction heads on top of the LXMERT backbone (SPEC 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lxtrain.model.config import LxmertConfig


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus an output bias.

    The decoder weight is not owned here: callers pass the word-embedding table, so the tie holds
    by construction and a checkpoint stores the table once.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


class ObjectHead(nn.Module):
    """Shared transform (dense -> GELU -> LayerNorm), then object-class, attribute and feature outputs."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.object_classifier = nn.Linear(config.hidden_size, config.num_object_labels)
        self.attribute_classifier = nn.Linear(config.hidden_size, config.num_attribute_labels)
        self.feature_regressor = nn.Linear(config.hidden_size, config.visual_feature_dim)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden)))


class AnswerHead(nn.Module):
    """Image-QA classifier on the pooled output: D -> 2D -> GELU -> LayerNorm -> answers."""

    def __init__(self, config: LxmertConfig, num_answers: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(2 * config.hidden_size, num_answers or config.num_qa_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(F.gelu(self.dense(pooled))))
