"""Per-kernel timings at LXMERT shapes: lxtrain's fused Triton kernels vs PyTorch SDPA vs eager PyTorch.

    python bench/kernels.py                      # on a CUDA GPU: bf16, micro-batch 32
    python bench/kernels.py --batch 256 --dtype bf16 --json out/kernels.json

Each case times forward + backward (gradients of every input, attention dropout and hidden dropout
on at 0.1, as in training) and forward alone, as the median of CUDA-event-timed repetitions after a
warm-up that also absorbs Triton's compilation. The fused kernels run on CUDA GPUs only: without one
this prints that, times the PyTorch baselines on CPU (for a dry run of the script) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lxtrain.model import attention as dispatch  # noqa: E402

TOKENS, OBJECTS, HEADS, HEAD_DIM, HIDDEN, FFN = 20, 36, 12, 64, 768, 3072  # LXMERT-base (SPEC 2)
DROPOUT = 0.1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""

    def cuda_time(fn: Callable[[], None], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    def cpu_time(fn: Callable[[], None], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cuda_time if device.type == "cuda" else cpu_time


def _heads(batch: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, Dh) laid out as the model makes it: a head split of a (B, L, D) projection."""
    hidden = torch.randn(batch, length, HIDDEN, device=device, dtype=dtype)
    return hidden.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_()


def _padding(batch: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    lengths = torch.randint(8, length + 1, (batch,), device=device)
    mask = (torch.arange(length, device=device)[None] < lengths[:, None]).float()
    return dispatch.padding_bias(mask, dtype)


def cases(batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Callable]]:
    """case name -> {implementation: fn() -> (output, inputs)}; fresh tensors, shared by the implementations."""
    language = [_heads(batch, TOKENS, device, dtype) for _ in range(3)]
    objects = [_heads(batch, OBJECTS, device, dtype) for _ in range(3)]
    language_bias = _padding(batch, TOKENS, device, dtype)

    def self_attention(qkv, bias, backend):
        return lambda: (dispatch.attention(*qkv, bias, dropout_p=DROPOUT, backend=backend), qkv)

    def cross(backend):
        return lambda: (
            dispatch.bidirectional_attention(
                tuple(language), tuple(objects), language_bias, None, dropout_p=DROPOUT, backend=backend
            ),
            [*language, *objects],
        )

    rows = batch * OBJECTS
    inner = torch.randn(rows, FFN, device=device, dtype=dtype, requires_grad=True)
    inner_bias = torch.zeros(FFN, device=device, dtype=dtype, requires_grad=True)
    hidden = torch.randn(rows, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(rows, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    up = nn.Linear(HIDDEN, FFN, device=device, dtype=dtype)
    down = nn.Linear(FFN, HIDDEN, device=device, dtype=dtype)
    norm = nn.LayerNorm(HIDDEN, eps=1e-12, device=device, dtype=dtype)
    epilogue_inputs = [hidden, down.bias, residual, norm.weight, norm.bias]

    def torch_norm_epilogue():
        total = F.dropout(hidden + down.bias, DROPOUT) + residual
        return F.layer_norm(total, (HIDDEN,), norm.weight, norm.bias, 1e-12), epilogue_inputs

    def fused_norm_epilogue():
        from lxtrain import kernels

        out = kernels.bias_dropout_residual_layer_norm(
            hidden, down.bias, residual, norm.weight, norm.bias, 1e-12, DROPOUT
        )
        return out, epilogue_inputs

    def fused_gelu():
        from lxtrain import kernels

        return kernels.bias_gelu(inner, inner_bias), [inner, inner_bias]

    feed_forward_inputs = [residual, *up.parameters(), *down.parameters(), *norm.parameters()]

    def feed_forward(backend):
        # The whole FFN sub-layer as the model runs it: both matmuls, both epilogues.
        def run():
            if backend in dispatch.EXACT_BACKENDS:
                out = norm(F.dropout(down(F.gelu(up(residual))), DROPOUT) + residual)
            else:
                out = dispatch.dense_dropout_residual_norm(
                    down, norm, dispatch.dense_gelu(up, residual, backend), residual, DROPOUT, backend
                )
            return out, feed_forward_inputs

        return run

    return {
        f"self-attention language (T={TOKENS}, padded)": {
            backend: self_attention(language, language_bias, backend)
            for backend in ("eager", "sdpa", "fused")
        },
        f"self-attention objects (O={OBJECTS})": {
            backend: self_attention(objects, None, backend) for backend in ("eager", "sdpa", "fused")
        },
        "cross-attention, both directions": {
            backend: cross(backend) for backend in ("eager", "sdpa", "fused")
        },
        f"bias+GELU ({rows}x{FFN})": {
            "eager": lambda: (F.gelu(inner + inner_bias), [inner, inner_bias]),
            "fused": fused_gelu,
        },
        f"bias+dropout+residual+LayerNorm ({rows}x{HIDDEN})": {
            "eager": torch_norm_epilogue,
            "fused": fused_norm_epilogue,
        },
        f"FFN sub-layer with both epilogues ({rows} rows)": {
            "eager": feed_forward("eager"),
            "fused": feed_forward("fused"),
        },
    }


def measure(fn: Callable, timer: Callable, warmup: int, reps: int) -> dict[str, float]:
    out, inputs = fn()
    upstream = torch.randn_like(out)

    def forward() -> None:
        fn()

    def forward_backward() -> None:
        result, leaves = fn()
        torch.autograd.grad(result, leaves, upstream)

    return {
        "forward_ms": timer(forward, warmup, reps),
        "forward_backward_ms": timer(forward_backward, warmup, reps),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (LXMERT: 32 per GPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = DTYPES[args.dtype] if on_gpu else torch.float32
    if not on_gpu:
        print("bench/kernels.py: no CUDA GPU here; the fused kernels are GPU-only and are not timed.")
        print("Timing the PyTorch baselines on CPU (fp32, few repetitions) as a dry run of this script.")
        args.warmup, args.reps = 1, min(args.reps, 3)
    torch.manual_seed(0)
    timer = _timer(device)
    header = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "shapes": {"tokens": TOKENS, "objects": OBJECTS, "heads": HEADS, "head_dim": HEAD_DIM},
        "dropout": DROPOUT,
    }
    if on_gpu:
        import triton

        header["triton"] = triton.__version__
    print(json.dumps(header))
    results = {}
    for case, implementations in cases(args.batch, device, dtype).items():
        results[case] = {}
        for name, fn in implementations.items():
            if name == "fused" and not on_gpu:
                results[case][name] = "GPU only"
                continue
            results[case][name] = measure(fn, timer, args.warmup, args.reps)
        _print_case(case, results[case])
    report = {**header, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_case(case: str, timings: dict) -> None:
    print(f"\n{case}")
    fused = timings.get("fused")
    for name, timing in timings.items():
        if not isinstance(timing, dict):
            print(f"  {name:6s} {timing}")
            continue
        line = f"  {name:6s} fwd {timing['forward_ms']:8.3f} ms   fwd+bwd {timing['forward_backward_ms']:8.3f} ms"
        if isinstance(fused, dict) and name != "fused":
            # > 1: the fused kernel is faster than this implementation.
            line += f"   {name}/fused fwd+bwd time x{timing['forward_backward_ms'] / fused['forward_backward_ms']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
