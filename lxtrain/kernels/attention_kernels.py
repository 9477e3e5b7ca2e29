"""Fused attention in Triton: softmax(q k^T / sqrt(d) + key_bias) with dropout, times v; forward and backward.

Design, for LXMERT's short sequences (20 tokens, 36 objects): every key of a (batch, head) fits in
one block, so a program holds K and V of its (batch, head, direction) in registers, walks the
queries in tiles and needs no online softmax; the backward program owns its keys, so dK and dV
accumulate in registers without atomics. One launch can serve two directions (language->vision
and vision->language, whose projections came from the same shared weights): the grid's second axis
picks the direction, and both write into one (B, Tq_0 + Tq_1, H, Dh) output that the shared output
projection then consumes in a single matmul.

Dropout: a counter-based Philox stream (``tl.rand``) keyed by (seed, element index), so the
backward regenerates the forward's mask instead of storing it.

This module only launches: ``launch_forward`` and ``launch_backward`` write into buffers that the
custom operators of ``lxtrain.kernels.ops`` allocate (and describe to torch.compile) and wire into
autograd.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lxtrain.kernels import _next_block, interpreter_requested

# Kernels decorated under the interpreter run on host tensors; the interpreter's tl.dot cannot
# multiply bf16 operands, so there the operands are widened to fp32 after the same rounding a GPU
# would apply (the product itself is exact in both cases, accumulation is fp32 in both).
INTERPRETED = interpreter_requested()


@triton.jit
def _matmul(a, b, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _probabilities(q, k, col_bias, scale, WIDEN: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax probabilities (fp32) of one query tile over all keys."""
    scores = _matmul(q, tl.trans(k), WIDEN, PRECISION) * scale + col_bias[None, :]
    # Columns past the real keys carry -inf; a row whose real keys are all padded still has finite
    # (finfo.min) scores, so the max is finite and the row gets the uniform weights eager attention gives.
    probs = tl.exp(scores - tl.max(scores, 1)[:, None])
    return probs / tl.sum(probs, 1)[:, None]


@triton.jit
def _keep(seed, rows, cols, dropout_p, BLOCK_N: tl.constexpr):
    """Dropout keep mask of one tile: Philox counters numbered (row, column), so backward regenerates it."""
    return tl.rand(seed, rows[:, None] * BLOCK_N + cols[None, :]) >= dropout_p


# The kernels below keep their long argument lists packed, one line per tensor's strides, which
# reads better than one argument per line.
# fmt: off
@triton.jit
def _load_keys(
    k_ptr, v_ptr, bias_ptr, batch, head, k_len, head_dim,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_biasb, stride_biask,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = cols < k_len
    tile_ok = key_ok[:, None] & (dims < head_dim)[None, :]
    k = tl.load(k_ptr + batch * stride_kb + head * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                mask=tile_ok, other=0.0)
    v = tl.load(v_ptr + batch * stride_vb + head * stride_vh + cols[:, None] * stride_vs + dims[None, :],
                mask=tile_ok, other=0.0)
    col_bias = tl.where(key_ok, 0.0, float("-inf"))
    if HAS_BIAS:
        col_bias += tl.load(bias_ptr + batch * stride_biasb + cols * stride_biask, mask=key_ok,
                            other=0.0).to(tl.float32)
    return k, v, col_bias, cols, tile_ok


@triton.jit
def _forward_direction(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_biasb, stride_biask, stride_ob, stride_oh, stride_os,
    batch, head, num_heads, q_len, k_len, head_dim, out_row0, out_rows, seed, dropout_p, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    k, v, col_bias, cols, tile_ok = _load_keys(
        k_ptr, v_ptr, bias_ptr, batch, head, k_len, head_dim, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_biasb, stride_biask, HAS_BIAS, BLOCK_N, BLOCK_D,
    )
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    # Dropout counters are numbered by output row, so the two directions of one launch never share one.
    rng_base = (batch * num_heads + head) * out_rows + out_row0
    for start in range(0, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < q_len)[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                    mask=row_ok, other=0.0)
        probs = _probabilities(q, k, col_bias, scale, WIDEN, PRECISION)
        if DROPOUT:
            keep = _keep(seed, rng_base + rows, cols, dropout_p, BLOCK_N)
            probs = tl.where(keep, probs / (1.0 - dropout_p), 0.0)
        out = _matmul(probs.to(v.dtype), v, WIDEN, PRECISION)
        out_at = out_ptr + batch * stride_ob + head * stride_oh + (out_row0 + rows)[:, None] * stride_os
        tl.store(out_at + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _attention_forward(
    q0, k0, v0, bias0, q1, k1, v1, bias1, out,
    sq0b, sq0h, sq0s, sk0b, sk0h, sk0s, sv0b, sv0h, sv0s, sbias0b, sbias0k,
    sq1b, sq1h, sq1s, sk1b, sk1h, sk1s, sv1b, sv1h, sv1s, sbias1b, sbias1k,
    sob, soh, sos,
    q_len0, k_len0, q_len1, k_len1, num_heads, head_dim, out_rows, seed, dropout_p, scale,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, DROPOUT: tl.constexpr, WIDEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(0)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    if tl.program_id(1) == 0:
        _forward_direction(q0, k0, v0, bias0, out, sq0b, sq0h, sq0s, sk0b, sk0h, sk0s, sv0b, sv0h, sv0s,
                           sbias0b, sbias0k, sob, soh, sos, batch, head, num_heads, q_len0, k_len0,
                           head_dim, 0, out_rows, seed, dropout_p, scale, HAS_BIAS0, DROPOUT, WIDEN,
                           PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _forward_direction(q1, k1, v1, bias1, out, sq1b, sq1h, sq1s, sk1b, sk1h, sk1s, sv1b, sv1h, sv1s,
                           sbias1b, sbias1k, sob, soh, sos, batch, head, num_heads, q_len1, k_len1,
                           head_dim, q_len0, out_rows, seed, dropout_p, scale, HAS_BIAS1, DROPOUT, WIDEN,
                           PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _backward_direction(
    q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_biasb, stride_biask, stride_gb, stride_gh, stride_gs,
    stride_dqb, stride_dqh, stride_dqs, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    batch, head, num_heads, q_len, k_len, head_dim, out_row0, out_rows, seed, dropout_p, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, WIDEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    k, v, col_bias, cols, tile_ok = _load_keys(
        k_ptr, v_ptr, bias_ptr, batch, head, k_len, head_dim, stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_biasb, stride_biask, HAS_BIAS, BLOCK_N, BLOCK_D,
    )
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    rng_base = (batch * num_heads + head) * out_rows + out_row0
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < q_len)[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                    mask=row_ok, other=0.0)
        dout_at = dout_ptr + batch * stride_gb + head * stride_gh + (out_row0 + rows)[:, None] * stride_gs
        dout = tl.load(dout_at + dims[None, :], mask=row_ok, other=0.0)
        # Recompute the probabilities (cheaper than storing them at these lengths) and the same mask.
        probs = _probabilities(q, k, col_bias, scale, WIDEN, PRECISION)
        dropped = probs
        dprobs = _matmul(dout, tl.trans(v), WIDEN, PRECISION)
        if DROPOUT:
            keep = _keep(seed, rng_base + rows, cols, dropout_p, BLOCK_N)
            dropped = tl.where(keep, probs / (1.0 - dropout_p), 0.0)
            dprobs = tl.where(keep, dprobs / (1.0 - dropout_p), 0.0)
        dv += _matmul(tl.trans(dropped.to(dout.dtype)), dout, WIDEN, PRECISION)
        # Softmax backward: dS = P * (dP - rowsum(P * dP)); padded columns have P = 0, padded rows dout = 0.
        dscores = probs * (dprobs - tl.sum(probs * dprobs, 1)[:, None]) * scale
        dq = _matmul(dscores.to(k.dtype), k, WIDEN, PRECISION)
        dq_at = dq_ptr + batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dqs
        tl.store(dq_at + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=row_ok)
        dk += _matmul(tl.trans(dscores.to(q.dtype)), q, WIDEN, PRECISION)
    dk_at = dk_ptr + batch * stride_dkb + head * stride_dkh + cols[:, None] * stride_dks
    tl.store(dk_at + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=tile_ok)
    dv_at = dv_ptr + batch * stride_dvb + head * stride_dvh + cols[:, None] * stride_dvs
    tl.store(dv_at + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _attention_backward(
    q0, k0, v0, bias0, dq0, dk0, dv0, q1, k1, v1, bias1, dq1, dk1, dv1, dout,
    sq0b, sq0h, sq0s, sk0b, sk0h, sk0s, sv0b, sv0h, sv0s, sbias0b, sbias0k,
    sq1b, sq1h, sq1s, sk1b, sk1h, sk1s, sv1b, sv1h, sv1s, sbias1b, sbias1k,
    sgb, sgh, sgs,
    sdq0b, sdq0h, sdq0s, sdk0b, sdk0h, sdk0s, sdv0b, sdv0h, sdv0s,
    sdq1b, sdq1h, sdq1s, sdk1b, sdk1h, sdk1s, sdv1b, sdv1h, sdv1s,
    q_len0, k_len0, q_len1, k_len1, num_heads, head_dim, out_rows, seed, dropout_p, scale,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, DROPOUT: tl.constexpr, WIDEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(0)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    if tl.program_id(1) == 0:
        _backward_direction(q0, k0, v0, bias0, dout, dq0, dk0, dv0, sq0b, sq0h, sq0s, sk0b, sk0h, sk0s,
                            sv0b, sv0h, sv0s, sbias0b, sbias0k, sgb, sgh, sgs, sdq0b, sdq0h, sdq0s,
                            sdk0b, sdk0h, sdk0s, sdv0b, sdv0h, sdv0s, batch, head, num_heads, q_len0,
                            k_len0, head_dim, 0, out_rows, seed, dropout_p, scale, HAS_BIAS0, DROPOUT,
                            WIDEN, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _backward_direction(q1, k1, v1, bias1, dout, dq1, dk1, dv1, sq1b, sq1h, sq1s, sk1b, sk1h, sk1s,
                            sv1b, sv1h, sv1s, sbias1b, sbias1k, sgb, sgh, sgs, sdq1b, sdq1h, sdq1s,
                            sdk1b, sdk1h, sdk1s, sdv1b, sdv1h, sdv1s, batch, head, num_heads, q_len1,
                            k_len1, head_dim, q_len0, out_rows, seed, dropout_p, scale, HAS_BIAS1, DROPOUT,
                            WIDEN, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
# fmt: on


def _strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of a (B, H, L, Dh) tensor whose last dimension is contiguous."""
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int]:
    if bias is None:
        return 0, 0
    return (bias.stride(0) if bias.shape[0] > 1 else 0), bias.stride(3)


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _launch_config(q_lens: list[int], k_lens: list[int], head_dim: int, dtype: torch.dtype) -> dict:
    block_n = _next_block(max(k_lens))
    block_d = _next_block(head_dim)
    # Query tiles of 32 keep the (tile x keys) score block and the resident K/V small enough for registers.
    block_m = min(32, _next_block(max(q_lens)))
    widen = INTERPRETED and dtype != torch.float32
    return dict(
        WIDEN=widen,
        PRECISION="ieee" if dtype == torch.float32 or widen else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4 if block_n * block_d <= 64 * 64 else 8,
    )


def launch_forward(
    out: torch.Tensor,
    q0: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    bias0: torch.Tensor | None,
    q1: torch.Tensor | None,
    k1: torch.Tensor | None,
    v1: torch.Tensor | None,
    bias1: torch.Tensor | None,
    dropout_p: float,
    seed: int,
) -> None:
    """Writes direction 0 (and 1, if ``q1`` is given) into ``out`` (B, Tq_0 + Tq_1, H, Dh)."""
    two_way = q1 is not None
    if not two_way:  # a one-direction launch: the unused argument slots repeat direction 0
        q1, k1, v1, bias1 = q0, k0, v0, bias0
    q0, k0, v0, q1, k1, v1 = (_last_dim_contiguous(t) for t in (q0, k0, v0, q1, k1, v1))
    grid, geometry, scale, config = _launch_geometry(q0, k0, q1, k1, two_way)
    _attention_forward[grid](
        q0, k0, v0, bias0, q1, k1, v1, bias1, out,
        *_strides(q0), *_strides(k0), *_strides(v0), *_bias_strides(bias0),
        *_strides(q1), *_strides(k1), *_strides(v1), *_bias_strides(bias1),
        out.stride(0), out.stride(2), out.stride(1),
        *geometry, seed, dropout_p, scale,
        HAS_BIAS0=bias0 is not None, HAS_BIAS1=bias1 is not None, DROPOUT=dropout_p > 0.0, **config,
    )  # fmt: skip


def launch_backward(
    grads: list[torch.Tensor],
    dout: torch.Tensor,
    q0: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    bias0: torch.Tensor | None,
    q1: torch.Tensor | None,
    k1: torch.Tensor | None,
    v1: torch.Tensor | None,
    bias1: torch.Tensor | None,
    dropout_p: float,
    seed: int,
) -> None:
    """Writes [dq0, dk0, dv0(, dq1, dk1, dv1)] into ``grads`` (head dimension contiguous), given the
    forward's inputs and seed: the probabilities and the dropout mask are recomputed, not stored."""
    two_way = q1 is not None
    if not two_way:  # direction 1's slots repeat direction 0; its programs are not launched
        q1, k1, v1, bias1 = q0, k0, v0, bias0
        grads = [*grads, *grads]
    q0, k0, v0, q1, k1, v1 = (_last_dim_contiguous(t) for t in (q0, k0, v0, q1, k1, v1))
    dout = _last_dim_contiguous(dout)
    dq0, dk0, dv0, dq1, dk1, dv1 = grads
    grid, geometry, scale, config = _launch_geometry(q0, k0, q1, k1, two_way)
    _attention_backward[grid](
        q0, k0, v0, bias0, dq0, dk0, dv0, q1, k1, v1, bias1, dq1, dk1, dv1, dout,
        *_strides(q0), *_strides(k0), *_strides(v0), *_bias_strides(bias0),
        *_strides(q1), *_strides(k1), *_strides(v1), *_bias_strides(bias1),
        dout.stride(0), dout.stride(2), dout.stride(1),
        *_strides(dq0), *_strides(dk0), *_strides(dv0), *_strides(dq1), *_strides(dk1), *_strides(dv1),
        *geometry, seed, dropout_p, scale,
        HAS_BIAS0=bias0 is not None, HAS_BIAS1=bias1 is not None, DROPOUT=dropout_p > 0.0, **config,
    )  # fmt: skip


def _launch_geometry(
    q0: torch.Tensor, k0: torch.Tensor, q1: torch.Tensor, k1: torch.Tensor, two_way: bool
) -> tuple[tuple[int, int], tuple[int, ...], float, dict]:
    """Grid, lengths, softmax scale and block configuration, the same for forward and backward."""
    batch, heads, q_len0, head_dim = q0.shape
    out_rows = q_len0 + (q1.shape[2] if two_way else 0)
    config = _launch_config([q_len0, q1.shape[2]], [k0.shape[2], k1.shape[2]], head_dim, q0.dtype)
    geometry = (q_len0, k0.shape[2], q1.shape[2], k1.shape[2], heads, head_dim, out_rows)
    return (batch * heads, 2 if two_way else 1), geometry, 1.0 / math.sqrt(head_dim), config
