"""Read cross-modality attention out of a normal forward pass (for the paper-style attention figures).

Hooks capture the query and key projections of the last cross-modality layer's shared attention
on its first call in a forward pass, which is the language -> vision direction. Only module
outputs are captured, so this works unchanged when ZeRO-3 partitions the parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def capture_cross_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the first forward fills ``captured`` with 'query' (B, T, D) and 'key' (B, O, D)."""
    attention = model.backbone.cross_layers[-1].cross_attention.attention
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            captured.setdefault(name, output.detach().float())

        return hook

    handles = [
        attention.query.register_forward_hook(keep("query")),
        attention.key.register_forward_hook(keep("key")),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def language_to_vision_attention(captured: dict[str, torch.Tensor], num_heads: int) -> torch.Tensor:
    """Attention probabilities (B, H, T, O) of words over boxes from captured projections.

    The visual side has no padding (SPEC 2), so no key bias is needed.
    """
    query, key = captured["query"], captured["key"]
    batch, tokens, hidden = query.shape
    head_dim = hidden // num_heads
    query = query.view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    key = key.view(batch, key.shape[1], num_heads, head_dim).transpose(1, 2)
    return torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
