"""The one attention function every LXMERT layer calls, and its backend dispatch.

Backends:
- ``eager``: softmax(q k^T / sqrt(d) + bias) v written out in PyTorch; the exact reference.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (same maths, fused by PyTorch).
- ``fused``: the project's own kernels (``lxtrain.kernels``), not built in this version; asking
  for it is an error rather than a silent fallback.
- ``auto``: the best available exact backend for the inputs (SDPA today).

The environment variable ``LXTRAIN_ATTENTION`` overrides the configured backend, so a run can be
switched without editing configs (e.g. to compare backends in a benchmark).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from lxtrain.model.config import ATTENTION_BACKENDS

ENV_OVERRIDE = "LXTRAIN_ATTENTION"


def resolve_backend(configured: str) -> str:
    """The backend to run: the environment override if set, else the configured one."""
    backend = os.environ.get(ENV_OVERRIDE, configured) or configured
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} (from {ENV_OVERRIDE} or the model config) is not one of "
            f"{ATTENTION_BACKENDS}"
        )
    if backend == "fused":
        raise RuntimeError(
            "attention backend 'fused' was requested but lxtrain's fused kernels are not available in "
            "this build; use 'auto', 'sdpa' or 'eager'"
        )
    return "sdpa" if backend == "auto" else backend


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key bias (B, 1, 1, Tk) from a 1/0 padding mask (B, Tk): 0 keeps, a large negative drops."""
    if mask is None:
        return None
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor | None,
    *,
    dropout_p: float,
    backend: str,
) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        query: (B, H, Tq, Dh). key, value: (B, H, Tk, Dh).
        key_bias: additive (B, 1, 1, Tk) bias from ``padding_bias``, or None.
        dropout_p: attention-probability dropout (pass 0.0 in eval mode).
        backend: a resolved backend name (``eager`` or ``sdpa``).

    Returns:
        The attended values (B, H, Tq, Dh).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_bias, dropout_p=dropout_p)
    if backend != "eager":
        raise ValueError(f"attention() takes a resolved backend ('eager' or 'sdpa'); got {backend!r}")
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if key_bias is not None:
        scores = scores + key_bias
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)
