"""Building blocks of LXMERT: embeddings, attention blocks, feed-forward blocks and the three layer kinds.

Shape legend: B batch, T tokens, O objects, D hidden, H heads, Dh head dim, F feed-forward width.
All blocks are post-LN (residual, then LayerNorm), as in BERT and the LXMERT release.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lxtrain.model.attention import (
    EXACT_BACKENDS,
    BackendDispatch,
    attention,
    bidirectional_attention,
    dense_dropout_residual_norm,
    dense_gelu,
    resolve_backend,
)
from lxtrain.model.config import LxmertConfig


class TextEmbeddings(nn.Module):
    """word + absolute position + token type, summed, then LayerNorm and dropout."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        # padding_idx 0 on all three tables, as in the reference: row 0 receives no gradient.
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embedded = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(embedded))  # (B, T, D)


class ObjectEmbeddings(nn.Module):
    """v = (LN(W_f f + b_f) + LN(W_p p + b_p)) / 2: RoI feature and box position, each normalised."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(config.visual_feature_dim, config.hidden_size)
        self.feature_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.box_proj = nn.Linear(config.visual_position_dim, config.hidden_size)
        self.box_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        feature_part = self.feature_norm(self.feature_proj(features))
        box_part = self.box_norm(self.box_proj(boxes))
        return self.dropout((feature_part + box_part) / 2)  # (B, O, D)


class MultiHeadAttention(nn.Module, BackendDispatch):
    """Queries from one sequence attend to keys/values of a context (itself, or the other modality).

    ``backend`` (and ``fused_epilogues``, read by the enclosing ``AttentionBlock``) are set once, at
    construction or by ``set_attention_backend``; see ``lxtrain.model.attention``.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.backend = config.attention_backend
        self.fused_epilogues = True

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, L, Dh)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None
    ) -> torch.Tensor:
        attended = attention(
            self._split_heads(self.query(hidden)),
            self._split_heads(self.key(context)),
            self._split_heads(self.value(context)),
            context_bias,
            dropout_p=self.dropout_p if self.training else 0.0,
            backend=resolve_backend(self.backend, hidden.device),
        )
        batch, _, length, _ = attended.shape
        return attended.transpose(1, 2).reshape(batch, length, -1)  # (B, L, D)


class AttentionBlock(nn.Module):
    """Attention, output projection, dropout, residual, LayerNorm. Self- or cross-attention alike."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(config)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None
    ) -> torch.Tensor:
        attended = self.attention(hidden, context, context_bias)
        backend = resolve_backend(self.attention.backend, hidden.device)
        if backend in EXACT_BACKENDS or not self.attention.fused_epilogues:
            return self.norm(self.dropout(self.output(attended)) + hidden)
        return self._fused_epilogue(attended, hidden, backend)

    def _fused_epilogue(self, attended: torch.Tensor, residual: torch.Tensor, backend: str) -> torch.Tensor:
        dropout_p = self.dropout.p if self.training else 0.0
        if not self.attention.fused_epilogues:
            # Same maths as the exact branch of forward (F.dropout draws like nn.Dropout).
            backend = "sdpa"
        return dense_dropout_residual_norm(self.output, self.norm, attended, residual, dropout_p, backend)

    def both_directions(
        self,
        language: torch.Tensor,
        objects: torch.Tensor,
        language_bias: torch.Tensor | None,
        object_bias: torch.Tensor | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Language->vision and vision->language through this one block: one attention launch, one
        output projection and one epilogue over both modalities' rows (fused backends only)."""
        heads = self.attention
        # Projection order = the two separate calls' order: the first query call is the language
        # one and the first key call the object one (lxtrain.model.inspection relies on it).
        language_query = heads._split_heads(heads.query(language))
        object_key = heads._split_heads(heads.key(objects))
        object_value = heads._split_heads(heads.value(objects))
        object_query = heads._split_heads(heads.query(objects))
        language_key = heads._split_heads(heads.key(language))
        language_value = heads._split_heads(heads.value(language))
        attended = bidirectional_attention(
            (language_query, language_key, language_value),
            (object_query, object_key, object_value),
            language_bias,
            object_bias,
            dropout_p=heads.dropout_p if self.training else 0.0,
            backend=backend,
        )  # (B, T + O, D)
        both = self._fused_epilogue(attended, torch.cat([language, objects], dim=1), backend)
        # One copy each here saves the implicit copies of every strided consumer downstream.
        return both[:, : language.shape[1]].contiguous(), both[:, language.shape[1] :].contiguous()


class FeedForward(nn.Module, BackendDispatch):
    """Linear D->F, exact GELU, Linear F->D, dropout, residual, LayerNorm."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # The attention backend also decides the epilogues: 'fused' (and 'auto' where it resolves to
        # the kernels) routes them there, unless the engine keeps them exact (ZeRO-3).
        self.backend = config.attention_backend
        self.fused_epilogues = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self.backend, hidden.device)
        if backend in EXACT_BACKENDS or not self.fused_epilogues:
            return self.norm(self.dropout(self.down(F.gelu(self.up(hidden)))) + hidden)
        inner = dense_gelu(self.up, hidden, backend)
        dropout_p = self.dropout.p if self.training else 0.0
        return dense_dropout_residual_norm(self.down, self.norm, inner, hidden, dropout_p, backend)


class TransformerLayer(nn.Module):
    """A single-modality encoder layer (language or object-relationship): self-attention then FFN."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.self_attention = AttentionBlock(config)
        self.feed_forward = FeedForward(config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.feed_forward(self.self_attention(hidden, hidden, bias))


class CrossModalityLayer(nn.Module):
    """Bi-directional cross-attention, then self-attention per modality, then FFN per modality."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        # ONE cross-attention block (attention + output dense + LayerNorm) serves both directions:
        # language->vision and vision->language use the same weights (SPEC 2, the paper's Figure 1).
        self.cross_attention = AttentionBlock(config)
        self.language_self_attention = AttentionBlock(config)
        self.object_self_attention = AttentionBlock(config)
        self.language_feed_forward = FeedForward(config)
        self.object_feed_forward = FeedForward(config)

    def forward(
        self,
        language: torch.Tensor,
        objects: torch.Tensor,
        language_bias: torch.Tensor | None,
        object_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both directions read the layer's *inputs*, so neither direction sees the other's update.
        backend = resolve_backend(self.cross_attention.attention.backend, language.device)
        if backend in EXACT_BACKENDS:
            language_cross = self.cross_attention(language, objects, object_bias)  # (B, T, D)
            objects_cross = self.cross_attention(objects, language, language_bias)  # (B, O, D)
        else:
            language_cross, objects_cross = self.cross_attention.both_directions(
                language, objects, language_bias, object_bias, backend
            )
        language = self.language_self_attention(language_cross, language_cross, language_bias)
        objects = self.object_self_attention(objects_cross, objects_cross, object_bias)
        return self.language_feed_forward(language), self.object_feed_forward(objects)
