"""lxtrain's own fused Triton kernels: attention (self and bi-directional cross) and layer epilogues.

This package is imported lazily: nothing here imports Triton until a kernel is actually needed, so
the model imports and runs (on the exact eager/SDPA path) where Triton is not installed.

Where the kernels run:
- on a CUDA GPU of compute capability 8.0 or newer (bf16 matrix units), compiled by Triton;
- on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first kernel
  import and still set when the kernel is called): slow, for correctness tests only.

Each kernel is a PyTorch custom operator (``torch.ops.lxtrain.*``, registered by
``lxtrain.kernels.ops`` when this package is imported; registration needs no Triton), so a model
calling the functions below compiles with ``torch.compile(fullgraph=True)``; dropout seeds are
tensor operands, drawn afresh on every run of a compiled graph (see ``ops``).

The model never calls this package directly: ``lxtrain.model.attention`` is the one dispatch that
decides, per call, between these kernels and the exact PyTorch path (see docs/kernels.md).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lxtrain.kernels import ops

# Limits of the kernels: every key of a row sits in one block, so the key length is bounded (LXMERT
# has 20 tokens and 36 objects); the head dimension is one block too.
MAX_KEYS = 128
MAX_HEAD_DIM = 128
MAX_HIDDEN = 16384
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Dropout offsets are int32 inside the kernels: a launch must not number more elements than this.
MAX_RANDOM_OFFSETS = 2**31 - 1


def interpreter_requested() -> bool:
    """True when Triton's CPU interpreter is switched on in the environment right now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        import triton  # noqa: F401
    except Exception as error:  # a broken or blocked install must read as 'unavailable', not crash the model
        return f"triton cannot be imported ({error})"
    return None


@functools.cache
def _cuda_unavailable_reason(index: int | None) -> str | None:
    # Asked by every layer on every forward: the answer cannot change within a process.
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(index) < (8, 0):
        return f"{torch.cuda.get_device_name(index)} is older than compute capability 8.0"
    return None


def unavailable_reason(device: torch.device | str | None) -> str | None:
    """Why the fused kernels cannot run on ``device`` (None: they can). Never imports the kernels' code."""
    device = torch.device(device if device is not None else "cpu")
    triton_error = _triton_import_error()
    if triton_error:
        return triton_error
    if device.type == "cuda":
        if interpreter_requested():
            return "TRITON_INTERPRET=1 is set, which runs kernels on the host only"
        return _cuda_unavailable_reason(device.index)
    if device.type == "cpu":
        if not interpreter_requested():
            return "on CPU they need Triton's interpreter (TRITON_INTERPRET=1), which is for tests only"
        return None
    return f"device type {device.type!r} is not supported"


def attention_unsupported_reason(
    queries: list[torch.Tensor], keys: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> str | None:
    """Why the attention kernel cannot take these (B, H, L, Dh) inputs (None: it can)."""
    first = queries[0]
    batch, heads, _, head_dim = first.shape
    for tensor in [*queries, *keys]:
        if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[1] != heads:
            return f"inconsistent attention shapes {[tuple(t.shape) for t in [*queries, *keys]]}"
        if tensor.shape[-1] != head_dim:
            return "query and key head dimensions differ"
        if tensor.dtype != first.dtype or tensor.device != first.device:
            return "attention inputs differ in dtype or device"
    if first.dtype not in SUPPORTED_DTYPES:
        return f"dtype {first.dtype} is not one of {SUPPORTED_DTYPES}"
    if head_dim > MAX_HEAD_DIM:
        return f"head dimension {head_dim} > {MAX_HEAD_DIM}"
    key_lengths = [key.shape[2] for key in keys]
    if min(key_lengths) < 1 or max(key_lengths) > MAX_KEYS:
        return f"key length {max(key_lengths)} outside 1..{MAX_KEYS}"
    if min(query.shape[2] for query in queries) < 1:
        return "empty query sequence"
    rows = sum(query.shape[2] for query in queries)
    if batch * heads * rows * _next_block(max(key_lengths)) > MAX_RANDOM_OFFSETS:
        return "too many attention probabilities in one launch for the int32 dropout offsets"
    for bias, key in zip(biases, keys, strict=True):
        if bias is None:
            continue
        if bias.dim() != 4 or bias.shape[1:3] != (1, 1) or bias.shape[-1] != key.shape[2]:
            return f"key bias shape {tuple(bias.shape)} is not a (B, 1, 1, Tk) key-padding bias"
        if bias.shape[0] not in (1, batch) or bias.requires_grad or not bias.is_floating_point():
            return "key bias must be a constant floating (B, 1, 1, Tk) tensor"
    return None


def epilogue_unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why the epilogue kernels cannot take these tensors (None: they can); the last dim is the row."""
    hidden = tensors[0].shape[-1]
    for tensor in tensors:
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"dtype {tensor.dtype} is not one of {SUPPORTED_DTYPES}"
        if tensor.device != tensors[0].device:
            return "epilogue inputs are on different devices"
    if hidden > MAX_HIDDEN:
        return f"row width {hidden} > {MAX_HIDDEN}"
    if tensors[0].numel() > MAX_RANDOM_OFFSETS:
        return "too many elements for the int32 dropout offsets"
    return None


def _next_block(length: int) -> int:
    """Block size covering ``length``: a power of two, at least 16 (the smallest tl.dot tile)."""
    return max(16, 1 << (max(length, 1) - 1).bit_length())


def attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    dropout_p: float,
    seed: int | None = None,
) -> torch.Tensor:
    """One launch of the fused attention for one direction, or two directions at once.

    Each direction d attends ``queries[d]`` (B, H, Tq_d, Dh) over ``keys[d]``/``values[d]``
    (B, H, Tk_d, Dh) with the additive key bias ``biases[d]`` (B, 1, 1, Tk_d) or None. The output
    is (B, Tq_0 + Tq_1, H, Dh): the directions' rows one after the other, heads interleaved the way
    the output projection wants them, so ``.view(B, T, H * Dh)`` is free. ``seed`` fixes the
    attention-dropout mask (default: drawn from torch's CPU generator, so ``torch.manual_seed``
    makes runs reproducible; under torch.compile the draw is an op of the graph, made on every run).
    """
    return ops.attention(queries, keys, values, biases, dropout_p, seed)


def bias_gelu(inputs: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(inputs + bias) with the exact (erf) GELU, one pass forward and one backward."""
    return ops.bias_gelu(inputs, bias)


def bias_dropout_residual_layer_norm(
    inputs: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: int | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(inputs + bias) + residual), one pass forward and one backward.

    ``seed`` fixes the dropout mask; by default it is drawn as ``attention``'s is.
    """
    return ops.bias_dropout_residual_layer_norm(
        inputs, bias, residual, norm_weight, norm_bias, eps, dropout_p, seed
    )


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (no device sync; follows torch.manual_seed).

    The kernels themselves draw with ``ops.seed_tensor``, the same draw kept as a tensor: a Python
    int would be a constant of a compiled graph (and ``int()`` of a traced tensor a graph break).
    """
    return int(torch.randint(0, ops.SEED_RANGE, (), dtype=torch.int64))
