"""The fused kernels as PyTorch custom operators (``torch.ops.lxtrain.*``), so they compose with torch.compile.

Dynamo cannot trace a raw Triton launch inside a ``torch.autograd.Function`` in ``fullgraph`` mode,
so each kernel launch is wrapped in an operator registered with ``torch.library.custom_op``: the
compiler sees one opaque node with a fake (meta) implementation for shapes, dtypes and strides, and
an autograd formula whose backward is itself an opaque operator calling the backward kernel.

Operators (all functional: they allocate their outputs and mutate nothing):

- ``lxtrain::attention(q0, k0, v0, bias0?, q1?, k1?, v1?, bias1?, dropout_p, seed) -> out``
  and ``lxtrain::attention_backward(dout, ...same inputs...) -> [dq0, dk0, dv0(, dq1, dk1, dv1)]``
- ``lxtrain::bias_gelu(inputs, bias) -> out`` and
  ``lxtrain::bias_gelu_backward(dout, inputs, bias) -> (dinputs, dbias)``
- ``lxtrain::bias_dropout_residual_layer_norm(inputs, bias, residual, norm_weight, norm_bias, eps,
  dropout_p, seed) -> (out, total, mean, rstd)`` (the last three are what backward needs) and
  ``lxtrain::bias_dropout_residual_layer_norm_backward(...) -> (dinputs, dbias, dresidual, dweight,
  dnorm_bias)``

Dropout seeds are an int64 scalar *tensor* on the CPU (``seed``), never a Python int in the
operator's schema: a Python int would be burned into a compiled graph as a constant, and every
step would apply the same dropout mask. ``seed_tensor`` draws it with ``torch.randint`` from torch's
default CPU generator, the same draw ``lxtrain.kernels.draw_seed`` makes; traced by dynamo, that
``randint`` is an op of the graph, so each run of a compiled graph draws a fresh seed, and
``torch.manual_seed`` still makes runs reproducible. The operator reads the seed on the host (a CPU
tensor: no device synchronisation); the backward operator gets the same seed tensor, so it
regenerates the forward's mask.

This module imports only torch: registering the operators needs no Triton. The real
implementations import the Triton modules on their first call.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEED_RANGE = 2**31 - 1
"""Seeds are drawn from [0, SEED_RANGE), as ``lxtrain.kernels.draw_seed`` draws them."""


def seed_tensor(dropout_p: float, seed: int | None) -> Tensor:
    """The seed operand of a dropout kernel: an int64 scalar on the CPU.

    ``seed`` given: that seed. Otherwise, with dropout on, a fresh draw from torch's default CPU
    generator (under torch.compile a graph op, so drawn again on every run of the graph); with
    dropout off no draw is made (the generator's state is left alone) and the seed is unused.
    """
    if seed is not None:
        return torch.tensor(seed, dtype=torch.int64)
    if dropout_p > 0.0:
        return torch.randint(0, SEED_RANGE, (), dtype=torch.int64)
    return torch.zeros((), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Output buffers. The real and the fake implementations allocate through the same functions, so
# the fake outputs have the real outputs' shapes, dtypes and strides by construction.


def _attention_output(q0: Tensor, q1: Tensor | None) -> Tensor:
    # (B, Tq_0 + Tq_1, H, Dh): the layout the shared output projection reads without a copy.
    batch, heads, rows, head_dim = q0.shape
    rows = rows + (q1.shape[2] if q1 is not None else 0)
    return torch.empty(batch, rows, heads, head_dim, dtype=q0.dtype, device=q0.device)


def _grad_buffer(tensor: Tensor) -> Tensor:
    # The kernels address the head dimension with stride 1; keep the input's layout where it has
    # that (the model's head-split views do), so the gradient flows back into it without a copy.
    if tensor.stride(-1) == 1:
        return torch.empty_like(tensor)
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)


def _attention_grads(inputs: list[Tensor | None]) -> list[Tensor]:
    return [_grad_buffer(tensor) for tensor in inputs if tensor is not None]


def _layer_norm_outputs(inputs: Tensor, residual: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shape, device = inputs.shape, inputs.device
    rows = inputs.numel() // shape[-1]
    out = torch.empty(shape, dtype=torch.promote_types(inputs.dtype, residual.dtype), device=device)
    # The pre-norm sum is kept in fp32 so that backward's normalised values match forward's exactly.
    total = torch.empty(shape, dtype=torch.float32, device=device)
    mean = torch.empty(rows, dtype=torch.float32, device=device)
    rstd = torch.empty(rows, dtype=torch.float32, device=device)
    return out, total, mean, rstd


# ---------------------------------------------------------------------------------------------
# Attention: one direction, or two directions in one launch.


@torch.library.custom_op("lxtrain::attention", mutates_args=())
def attention_op(
    q0: Tensor,
    k0: Tensor,
    v0: Tensor,
    bias0: Tensor | None,
    q1: Tensor | None,
    k1: Tensor | None,
    v1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    seed: Tensor,
) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + bias) with dropout, times v, for direction 0 and (if q1 is given) 1."""
    from lxtrain.kernels import attention_kernels

    out = _attention_output(q0, q1)
    attention_kernels.launch_forward(out, q0, k0, v0, bias0, q1, k1, v1, bias1, dropout_p, int(seed))
    return out


@attention_op.register_fake
def _attention_fake(q0, k0, v0, bias0, q1, k1, v1, bias1, dropout_p, seed):
    return _attention_output(q0, q1)


@torch.library.custom_op("lxtrain::attention_backward", mutates_args=())
def attention_backward_op(
    dout: Tensor,
    q0: Tensor,
    k0: Tensor,
    v0: Tensor,
    bias0: Tensor | None,
    q1: Tensor | None,
    k1: Tensor | None,
    v1: Tensor | None,
    bias1: Tensor | None,
    dropout_p: float,
    seed: Tensor,
) -> list[Tensor]:
    """[dq0, dk0, dv0] and, for a two-direction launch, [dq1, dk1, dv1] after them."""
    from lxtrain.kernels import attention_kernels

    grads = _attention_grads([q0, k0, v0, q1, k1, v1])
    attention_kernels.launch_backward(grads, dout, q0, k0, v0, bias0, q1, k1, v1, bias1, dropout_p, int(seed))
    return grads


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q0, k0, v0, bias0, q1, k1, v1, bias1, dropout_p, seed):
    return _attention_grads([q0, k0, v0, q1, k1, v1])


def _attention_setup_context(ctx, inputs, output) -> None:
    q0, k0, v0, bias0, q1, k1, v1, bias1, dropout_p, seed = inputs
    # No probabilities are saved: backward recomputes them, and regenerates the mask from the seed.
    ctx.save_for_backward(q0, k0, v0, bias0, q1, k1, v1, bias1, seed)
    ctx.dropout_p = dropout_p


def _attention_backward(ctx, dout: Tensor):
    q0, k0, v0, bias0, q1, k1, v1, bias1, seed = ctx.saved_tensors
    grads = attention_backward_op(dout, q0, k0, v0, bias0, q1, k1, v1, bias1, ctx.dropout_p, seed)
    # The key biases are constants (attention_unsupported_reason refuses ones that need a gradient).
    second = (*grads[3:], None) if q1 is not None else (None, None, None, None)
    return (*grads[:3], None, *second, None, None)


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(
    queries: list[Tensor],
    keys: list[Tensor],
    values: list[Tensor],
    biases: list[Tensor | None],
    dropout_p: float,
    seed: int | None,
) -> Tensor:
    """See ``lxtrain.kernels.attention``; inputs are assumed checked by ``attention_unsupported_reason``."""
    second = (queries[1], keys[1], values[1], biases[1]) if len(queries) == 2 else (None, None, None, None)
    return attention_op(
        queries[0], keys[0], values[0], biases[0], *second, dropout_p, seed_tensor(dropout_p, seed)
    )


# ---------------------------------------------------------------------------------------------
# bias + GELU.


@torch.library.custom_op("lxtrain::bias_gelu", mutates_args=())
def bias_gelu_op(inputs: Tensor, bias: Tensor) -> Tensor:
    """gelu(inputs + bias), exact (erf) GELU; the bias broadcasts over the last dimension."""
    from lxtrain.kernels import epilogue_kernels

    out = torch.empty(inputs.shape, dtype=inputs.dtype, device=inputs.device)
    epilogue_kernels.launch_bias_gelu(out, inputs, bias)
    return out


@bias_gelu_op.register_fake
def _bias_gelu_fake(inputs, bias):
    return torch.empty(inputs.shape, dtype=inputs.dtype, device=inputs.device)


@torch.library.custom_op("lxtrain::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(dout: Tensor, inputs: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(d inputs, d bias) of ``bias_gelu``; the bias gradient is summed in fp32."""
    from lxtrain.kernels import epilogue_kernels

    dx = torch.empty(inputs.shape, dtype=inputs.dtype, device=inputs.device)
    epilogue_kernels.launch_bias_gelu_backward(dx, dout, inputs, bias)
    dbias = dx.reshape(-1, bias.numel()).sum(0, dtype=torch.float32).to(bias.dtype).reshape(bias.shape)
    return dx, dbias


@bias_gelu_backward_op.register_fake
def _bias_gelu_backward_fake(dout, inputs, bias):
    dx = torch.empty(inputs.shape, dtype=inputs.dtype, device=inputs.device)
    return dx, torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)


def _bias_gelu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, dout: Tensor):
    inputs, bias = ctx.saved_tensors
    return bias_gelu_backward_op(dout, inputs, bias)


bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


def bias_gelu(inputs: Tensor, bias: Tensor) -> Tensor:
    """See ``lxtrain.kernels.bias_gelu``."""
    return bias_gelu_op(inputs, bias)


# ---------------------------------------------------------------------------------------------
# bias + dropout + residual + LayerNorm.


@torch.library.custom_op("lxtrain::bias_dropout_residual_layer_norm", mutates_args=())
def layer_norm_epilogue_op(
    inputs: Tensor,
    bias: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    dropout_p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(LayerNorm(dropout(inputs + bias) + residual), the fp32 pre-norm sum, row means, row 1/std)."""
    from lxtrain.kernels import epilogue_kernels

    outputs = _layer_norm_outputs(inputs, residual)
    epilogue_kernels.launch_layer_norm_epilogue(
        *outputs, inputs, bias, residual, norm_weight, norm_bias, eps, dropout_p, int(seed)
    )
    return outputs


@layer_norm_epilogue_op.register_fake
def _layer_norm_epilogue_fake(inputs, bias, residual, norm_weight, norm_bias, eps, dropout_p, seed):
    return _layer_norm_outputs(inputs, residual)


@torch.library.custom_op("lxtrain::bias_dropout_residual_layer_norm_backward", mutates_args=())
def layer_norm_epilogue_backward_op(
    dout: Tensor,
    total: Tensor,
    mean: Tensor,
    rstd: Tensor,
    norm_weight: Tensor,
    dropout_p: float,
    seed: Tensor,
    input_dtype: torch.dtype,
    bias_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    norm_bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d inputs, d bias, d residual, d norm_weight, d norm_bias), each in its input's dtype."""
    from lxtrain.kernels import epilogue_kernels

    dx = torch.empty(total.shape, dtype=input_dtype, device=total.device)
    dresidual = torch.empty(total.shape, dtype=residual_dtype, device=total.device)
    dweight, dnorm_bias, dbias = epilogue_kernels.launch_layer_norm_epilogue_backward(
        dx, dresidual, dout, total, mean, rstd, norm_weight, dropout_p, int(seed)
    )
    # copy=True: the three sums are rows of one buffer, and an operator's outputs must not alias.
    return (
        dx,
        dbias.to(bias_dtype, copy=True),
        dresidual,
        dweight.to(norm_weight.dtype, copy=True),
        dnorm_bias.to(norm_bias_dtype, copy=True),
    )


@layer_norm_epilogue_backward_op.register_fake
def _layer_norm_epilogue_backward_fake(
    dout,
    total,
    mean,
    rstd,
    norm_weight,
    dropout_p,
    seed,
    input_dtype,
    bias_dtype,
    residual_dtype,
    norm_bias_dtype,
):
    width = total.shape[-1]
    return (
        torch.empty(total.shape, dtype=input_dtype, device=total.device),
        torch.empty(width, dtype=bias_dtype, device=total.device),
        torch.empty(total.shape, dtype=residual_dtype, device=total.device),
        torch.empty(width, dtype=norm_weight.dtype, device=total.device),
        torch.empty(width, dtype=norm_bias_dtype, device=total.device),
    )


def _layer_norm_epilogue_setup_context(ctx, inputs, output) -> None:
    inputs_, bias, residual, norm_weight, norm_bias, _eps, dropout_p, seed = inputs
    _out, total, mean, rstd = output
    ctx.save_for_backward(total, mean, rstd, norm_weight, seed)
    ctx.dropout_p = dropout_p
    ctx.dtypes = (inputs_.dtype, bias.dtype, residual.dtype, norm_bias.dtype)
    # The saved statistics are outputs only so that backward can have them; no gradient flows into
    # them, and not materialising zeros for their gradients saves a full fp32 activation per call.
    ctx.mark_non_differentiable(total, mean, rstd)
    ctx.set_materialize_grads(False)


def _layer_norm_epilogue_backward(ctx, dout: Tensor | None, *_statistics_grads):
    total, mean, rstd, norm_weight, seed = ctx.saved_tensors
    if dout is None:  # the output was not used (grads are not materialised): nothing flows back
        return (None,) * 8
    grads = layer_norm_epilogue_backward_op(
        dout, total, mean, rstd, norm_weight, ctx.dropout_p, seed, *ctx.dtypes
    )
    return (*grads, None, None, None)


layer_norm_epilogue_op.register_autograd(
    _layer_norm_epilogue_backward, setup_context=_layer_norm_epilogue_setup_context
)


def bias_dropout_residual_layer_norm(
    inputs: Tensor,
    bias: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    dropout_p: float,
    seed: int | None,
) -> Tensor:
    """See ``lxtrain.kernels.bias_dropout_residual_layer_norm``."""
    out, _total, _mean, _rstd = layer_norm_epilogue_op(
        inputs, bias, residual, norm_weight, norm_bias, eps, dropout_p, seed_tensor(dropout_p, seed)
    )
    return out
