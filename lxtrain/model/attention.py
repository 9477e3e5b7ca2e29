"""The one dispatch between the exact PyTorch path and lxtrain's fused kernels (``lxtrain.kernels``).

Backends (``LxmertConfig.attention_backend``, set by ``--attention`` in pre-training and fine-tuning):
- ``eager``: softmax(q k^T / sqrt(d) + bias) v written out in PyTorch; the exact reference.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (same maths, fused by PyTorch).
- ``fused``: the project's Triton kernels for attention (self, and both cross-attention directions
  in one launch) and for the layer epilogues (bias + GELU; bias + dropout + residual + LayerNorm).
  Where they cannot run (no CUDA GPU of compute capability 8.0+, no Triton, an unsupported shape
  or dtype) asking for them is an error naming the reason, never a silent change of maths.
- ``auto`` (the default): the fastest path measured, which today is ``sdpa`` on every device. On an
  H200 (docs/kernels.md, "Results") the fused kernels were slower than SDPA and PyTorch's
  elementwise ops at LXMERT's shapes, so ``auto`` does not pick them; ``fused`` stays available
  when asked for. ``AUTO_USES_FUSED_KERNELS`` switches ``auto`` back to "fused on a CUDA GPU for
  the inputs the kernels support, else the exact path" once a measurement says they win.

Precedence, settled once when a model is built (``set_attention_backend``, which the backbone
calls): the environment variable ``LXTRAIN_ATTENTION`` if set (to switch a run without editing its
command, e.g. to compare backends), else the requested backend (``--attention``, else the model
config's). The choice is stored on the dispatching modules (``BackendDispatch``); no forward reads
the environment. What the device decides is settled per call by ``resolve_backend`` (a pure
function of the choice and the device), what a call's shapes decide by the functions below.
Parallelism is not the model's business: the engine (``lxtrain.engine.check_attention_backend``)
refuses ``fused`` under ZeRO-3 and keeps ``auto``'s epilogues exact there.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from lxtrain import kernels
from lxtrain.model.config import ATTENTION_BACKENDS

ENV_OVERRIDE = "LXTRAIN_ATTENTION"
AUTO_USES_FUSED_KERNELS = False
"""Whether ``auto`` may pick the fused kernels on a CUDA GPU. Off: bench/kernels.py on an H200 timed
them slower than SDPA (0.44-1.02x) and the fused epilogues slower than PyTorch (0.34-0.66x)."""
EXACT_BACKENDS = ("eager", "sdpa")
"""Resolved backends on which the layers run their original PyTorch code unchanged."""

logger = logging.getLogger(__name__)
_reported: set[str] = set()


def _report_once(message: str, level: int = logging.WARNING) -> None:
    # Called on every layer's forward: one line per distinct reason, not one per call. Inside a
    # torch.compile trace a log call would break the graph; the eager first call has said it.
    if torch.compiler.is_compiling():
        return
    if message not in _reported:
        _reported.add(message)
        logger.log(level, message)


class BackendDispatch:
    """Marks the modules whose forward dispatches on an attention backend.

    ``backend`` is the backend chosen for the model (``auto``, ``eager``, ``sdpa`` or ``fused``);
    ``fused_epilogues`` is False where the engine keeps the epilogues on the exact path (ZeRO-3).
    """

    backend: str = "auto"
    fused_epilogues: bool = True


def choose_backend(requested: str) -> str:
    """The backend a model built now runs: ``LXTRAIN_ATTENTION`` if set (non-empty), else ``requested``.

    Reads the environment once; raises ``ValueError`` naming where an unknown name came from.
    """
    override = os.environ.get(ENV_OVERRIDE, "")
    backend = override or requested
    if backend not in ATTENTION_BACKENDS:
        source = f"the environment variable {ENV_OVERRIDE}" if override else "--attention / the model config"
        raise ValueError(f"attention backend {backend!r} (from {source}) is not one of {ATTENTION_BACKENDS}")
    return backend


def set_attention_backend(model: nn.Module, requested: str) -> str:
    """Give every dispatching module of ``model`` the backend ``choose_backend(requested)``; returns it.

    The one place a built model's backend is set: the backbone calls it at construction with the
    config's ``attention_backend``; an entry point that builds its model from a stored config calls
    it again with its ``--attention`` (``LXTRAIN_ATTENTION`` still wins).
    """
    backend = choose_backend(requested)
    for module in model.modules():
        if isinstance(module, BackendDispatch):
            module.backend = backend
    return backend


def attention_backend_of(model: nn.Module) -> str | None:
    """The backend ``model``'s dispatching modules hold (None: no LXMERT layers in it)."""
    backends = {module.backend for module in model.modules() if isinstance(module, BackendDispatch)}
    if len(backends) > 1:
        raise ValueError(f"the model's layers hold different attention backends {sorted(backends)}")
    return next(iter(backends), None)


def keep_epilogues_exact(model: nn.Module) -> None:
    """Run ``model``'s layer epilogues on the exact PyTorch path whatever the backend; attention is unchanged.

    For DeepSpeed ZeRO-3, which gathers a module's weights only inside that module's own forward:
    the fused epilogues read the dense and LayerNorm weights from the parent block.
    """
    for module in model.modules():
        if isinstance(module, BackendDispatch):
            module.fused_epilogues = False


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """What the chosen ``backend`` runs on ``device`` (default CPU); reads no environment.

    Returns ``eager``, ``sdpa``, ``fused``, or ``auto`` when the fused kernels can run on the device
    and the inputs of each call decide (the functions below fall back to the exact path per call).
    Raises if ``fused`` is forced where the kernels cannot run.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    if backend in EXACT_BACKENDS:
        return backend
    device = torch.device(device if device is not None else "cpu")
    if backend == "auto" and device.type != "cuda":
        # CPU is the expected home of the exact path: said once, quietly.
        _report_once(
            f"attention backend 'auto' on {device.type}: using sdpa (fused kernels need CUDA)", logging.INFO
        )
        return "sdpa"
    if backend == "auto" and not AUTO_USES_FUSED_KERNELS:
        _report_once(
            f"attention backend 'auto' on {device}: using sdpa, measured faster than lxtrain's fused "
            "kernels at LXMERT's shapes (--attention fused or LXTRAIN_ATTENTION=fused runs them)",
            logging.INFO,
        )
        return "sdpa"
    reason = kernels.unavailable_reason(device)
    if reason is None:
        return backend
    if backend == "fused":
        raise RuntimeError(
            f"attention backend 'fused' was requested but lxtrain's fused kernels are not available on "
            f"{device}: {reason}; use 'auto', 'sdpa' or 'eager'"
        )
    _report_once(f"attention backend 'auto' on {device}: using sdpa, fused kernels unavailable ({reason})")
    return "sdpa"


def _fused_or_fallback(backend: str, what: str, reason: str | None) -> bool:
    """Whether to run ``what`` fused; raises if the fused backend was forced and cannot take these inputs."""
    if backend in EXACT_BACKENDS:
        return False
    if reason is None:
        return True
    if backend == "fused":
        raise RuntimeError(f"attention backend 'fused' cannot run {what}: {reason}; use 'auto' or 'sdpa'")
    _report_once(f"attention backend 'auto': {what} falls back to the exact path ({reason})")
    return False


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
        backend: a backend from ``resolve_backend``.

    Returns:
        The attended values (B, H, Tq, Dh).
    """
    if backend not in EXACT_BACKENDS and _fused_or_fallback(
        backend, "this attention", kernels.attention_unsupported_reason([query], [key], [key_bias])
    ):
        # The kernel writes (B, Tq, H, Dh); the transposed view is what callers reshape back for free.
        return kernels.attention([query], [key], [value], [key_bias], dropout_p).transpose(1, 2)
    if backend not in EXACT_BACKENDS:
        backend = "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_bias, dropout_p=dropout_p)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if key_bias is not None:
        scores = scores + key_bias
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)


def bidirectional_attention(
    language: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    objects: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    language_bias: torch.Tensor | None,
    object_bias: torch.Tensor | None,
    *,
    dropout_p: float,
    backend: str,
) -> torch.Tensor:
    """Language queries over object keys and object queries over language keys, in one fused launch.

    Args:
        language, objects: (query, key, value) projections (B, H, L, Dh) of each modality, made with
            the one shared cross-attention module's weights.
        language_bias, object_bias: additive key biases (B, 1, 1, L) of each modality, or None.

    Returns:
        (B, T + O, H * Dh): the language rows, then the object rows, ready for the shared output projection.
    """
    queries, keys, values = [language[0], objects[0]], [objects[1], language[1]], [objects[2], language[2]]
    biases = [object_bias, language_bias]
    if backend not in EXACT_BACKENDS and _fused_or_fallback(
        backend,
        "the bi-directional cross-attention",
        kernels.attention_unsupported_reason(queries, keys, biases),
    ):
        return kernels.attention(queries, keys, values, biases, dropout_p).flatten(2)
    attended = [
        attention(query, key, value, bias, dropout_p=dropout_p, backend=backend)
        for query, key, value, bias in zip(queries, keys, values, biases, strict=True)
    ]
    return torch.cat([part.transpose(1, 2).flatten(2) for part in attended], dim=1)


def _epilogue_reason(dense: nn.Linear, *tensors: torch.Tensor | None) -> str | None:
    if dense.bias is None:
        return "the dense layer has no bias"
    present = [tensor for tensor in tensors if tensor is not None]
    return kernels.epilogue_unsupported_reason(*present, dense.weight, dense.bias)


def _norm_epilogue_reason(
    dense: nn.Linear, norm: nn.LayerNorm, hidden: torch.Tensor, residual: torch.Tensor
) -> str | None:
    if norm.weight is None or norm.bias is None:
        return "the LayerNorm has no affine parameters"
    if tuple(norm.normalized_shape) != (residual.shape[-1],):
        return f"LayerNorm over {tuple(norm.normalized_shape)} is not a per-row norm"
    return _epilogue_reason(dense, hidden, residual, norm.weight, norm.bias)


def dense_gelu(dense: nn.Linear, hidden: torch.Tensor, backend: str) -> torch.Tensor:
    """gelu(dense(hidden)) with the exact GELU; fused: the bias and GELU in one pass after the matmul."""
    if backend not in EXACT_BACKENDS and _fused_or_fallback(
        backend, "the bias+GELU epilogue", _epilogue_reason(dense, hidden)
    ):
        return kernels.bias_gelu(F.linear(hidden, dense.weight), dense.bias)
    return F.gelu(dense(hidden))


def dense_dropout_residual_norm(
    dense: nn.Linear,
    norm: nn.LayerNorm,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    dropout_p: float,
    backend: str,
) -> torch.Tensor:
    """norm(dropout(dense(hidden)) + residual); fused: bias, dropout, residual and LayerNorm in one pass.

    ``dropout_p`` is the rate to apply now (0.0 in eval mode). The fused dropout draws its mask from
    its own seeded stream, so it equals PyTorch's in distribution, not bit for bit.
    """
    if backend not in EXACT_BACKENDS and _fused_or_fallback(
        backend,
        "the bias+dropout+residual+LayerNorm epilogue",
        _norm_epilogue_reason(dense, norm, hidden, residual),
    ):
        return kernels.bias_dropout_residual_layer_norm(
            F.linear(hidden, dense.weight), dense.bias, residual, norm.weight, norm.bias, norm.eps, dropout_p
        )
    return norm(F.dropout(dense(hidden), p=dropout_p, training=dropout_p > 0.0) + residual)
