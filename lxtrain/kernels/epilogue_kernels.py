"""Fused layer epilogues in Triton: bias + exact GELU, and bias + dropout + residual + LayerNorm.

Both replace chains of elementwise PyTorch kernels (each a full read and write of the activation)
with one pass forward and one pass backward. Arithmetic is fp32 in registers whatever the storage
dtype. The LayerNorm epilogue's dropout uses the same counter-based Philox stream as attention
(``tl.rand`` keyed by seed and element index), so backward regenerates the mask instead of storing it.

The ``launch_*`` functions write into buffers allocated by the custom operators of
``lxtrain.kernels.ops``, which wire them into autograd and torch.compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Compiled kernels may read a module global only if it is a tl.constexpr (the interpreter reads any).
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_BLOCK = 1024


@triton.jit
def _bias_gelu_forward(x_ptr, bias_ptr, out_ptr, numel, width, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + offsets % width, mask=ok, other=0.0).to(tl.float32)
    out = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_backward(x_ptr, bias_ptr, dout_ptr, dx_ptr, numel, width, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + offsets % width, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    # d/dx [x Phi(x)] = Phi(x) + x phi(x)
    slope = 0.5 * (1.0 + tl.math.erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    tl.store(dx_ptr + offsets, (dout * slope).to(dx_ptr.dtype.element_ty), mask=ok)


def launch_bias_gelu(out: torch.Tensor, inputs: torch.Tensor, bias: torch.Tensor) -> None:
    """Writes gelu(inputs + bias) into the contiguous ``out``."""
    inputs = inputs.contiguous()
    grid = (triton.cdiv(inputs.numel(), GELU_BLOCK),)
    _bias_gelu_forward[grid](inputs, bias, out, inputs.numel(), bias.numel(), BLOCK=GELU_BLOCK)


def launch_bias_gelu_backward(
    dx: torch.Tensor, dout: torch.Tensor, inputs: torch.Tensor, bias: torch.Tensor
) -> None:
    """Writes the inputs' gradient into the contiguous ``dx`` (the bias gradient is its column sum)."""
    inputs, dout = inputs.contiguous(), dout.contiguous()
    grid = (triton.cdiv(inputs.numel(), GELU_BLOCK),)
    _bias_gelu_backward[grid](inputs, bias, dout, dx, inputs.numel(), bias.numel(), BLOCK=GELU_BLOCK)


@triton.jit
def _ln_epilogue_forward(
    x_ptr,
    bias_ptr,
    residual_ptr,
    weight_ptr,
    norm_bias_ptr,
    out_ptr,
    sum_ptr,
    mean_ptr,
    rstd_ptr,
    width,
    eps,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    at = row * width + cols
    hidden = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    hidden += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = tl.rand(seed, at) >= dropout_p
        hidden = tl.where(keep, hidden / (1.0 - dropout_p), 0.0)
    total = hidden + tl.load(residual_ptr + at, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(total, 0) / width
    centred = tl.where(ok, total - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / width + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(norm_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (centred * rstd * weight + shift).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(sum_ptr + at, total.to(sum_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_epilogue_backward(
    dout_ptr,
    sum_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    dx_ptr,
    dresidual_ptr,
    dweight_part_ptr,
    dnorm_bias_part_ptr,
    dbias_part_ptr,
    rows,
    width,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each program walks rows pid, pid + G, ... and keeps its share of the column sums (the three
    # parameter gradients) in registers; the host adds the G partial rows.
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK,), dtype=tl.float32)
    dnorm_bias = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(program, rows, programs):
        at = row * width + cols
        dout = tl.load(dout_ptr + at, mask=ok, other=0.0).to(tl.float32)
        total = tl.load(sum_ptr + at, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = tl.where(ok, (total - tl.load(mean_ptr + row)) * rstd, 0.0)
        dnormed = dout * weight
        dtotal = rstd * (
            dnormed - tl.sum(dnormed, 0) / width - normed * (tl.sum(dnormed * normed, 0) / width)
        )
        dhidden = dtotal
        if DROPOUT:
            keep = tl.rand(seed, at) >= dropout_p
            dhidden = tl.where(keep, dtotal / (1.0 - dropout_p), 0.0)
        tl.store(dresidual_ptr + at, dtotal.to(dresidual_ptr.dtype.element_ty), mask=ok)
        tl.store(dx_ptr + at, dhidden.to(dx_ptr.dtype.element_ty), mask=ok)
        dweight += dout * normed
        dnorm_bias += dout
        dbias += dhidden
    part = program * width + cols
    tl.store(dweight_part_ptr + part, dweight, mask=ok)
    tl.store(dnorm_bias_part_ptr + part, dnorm_bias, mask=ok)
    tl.store(dbias_part_ptr + part, dbias, mask=ok)


def _row_block(width: int) -> tuple[int, int]:
    block = triton.next_power_of_2(width)
    return block, min(16, max(1, block // 256))


def launch_layer_norm_epilogue(
    out: torch.Tensor,
    total: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    inputs: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: int,
) -> None:
    """Writes the output, the fp32 pre-norm sum and the rows' mean and 1/std (all contiguous)."""
    width = inputs.shape[-1]
    rows = inputs.numel() // width
    inputs, residual = inputs.contiguous(), residual.contiguous()
    block, warps = _row_block(width)
    _ln_epilogue_forward[(rows,)](
        inputs, bias, residual, norm_weight, norm_bias, out, total, mean, rstd,
        width, eps, seed, dropout_p, DROPOUT=dropout_p > 0.0, BLOCK=block, num_warps=warps,
    )  # fmt: skip


def launch_layer_norm_epilogue_backward(
    dx: torch.Tensor,
    dresidual: torch.Tensor,
    dout: torch.Tensor,
    total: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm_weight: torch.Tensor,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes the inputs' and the residual's gradients into ``dx`` and ``dresidual`` (contiguous);
    returns the fp32 gradients of the LayerNorm weight, the LayerNorm bias and the dense bias."""
    dout = dout.contiguous()
    width = total.shape[-1]
    rows = total.numel() // width
    # Enough programs to fill a GPU, few enough that the partial sums stay a small fraction of the work.
    programs = max(1, min(rows, 256 if total.is_cuda else 4))
    parts = torch.empty(3, programs, width, dtype=torch.float32, device=total.device)
    block, warps = _row_block(width)
    _ln_epilogue_backward[(programs,)](
        dout, total, mean, rstd, norm_weight, dx, dresidual, parts[0], parts[1], parts[2],
        rows, width, seed, dropout_p, DROPOUT=dropout_p > 0.0, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    dweight, dnorm_bias, dbias = parts.sum(1)
    return dweight, dnorm_bias, dbias
