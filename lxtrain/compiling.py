"""``--compile``: the training forward (model plus objective) as one ``torch.compile`` graph.

Modes:
- ``off``: eager PyTorch.
- ``default``: ``torch.compile(fullgraph=True, dynamic=False)`` with Inductor; one graph per
  set of active tasks (a curriculum has a handful), recompiled never for the shapes (static).
- ``cudagraphs``: the same, with Inductor's CUDA graphs (``mode="reduce-overhead"``): a step's
  thousands of kernel launches replayed as one. CUDA only.
- ``auto`` (the default): ``default`` on a CUDA GPU, ``off`` on CPU (Inductor's C++ code does
  run there, but compiling LXMERT-base takes minutes of a small CPU's time, more than a demo's
  steps win back) and ``off`` under ZeRO-3, whose per-module parameter gathering runs as hooks
  that a full graph cannot hold. If compiling fails under ``auto`` the run continues eager with
  one log line; a mode asked for by name fails with the reason instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

AUTO, OFF, DEFAULT, CUDAGRAPHS = "auto", "off", "default", "cudagraphs"
COMPILE_MODES = (AUTO, OFF, DEFAULT, CUDAGRAPHS)
# A curriculum turns tasks on and off and weighs them: each distinct set is its own graph.
RECOMPILE_LIMIT = 64

logger = logging.getLogger(__name__)


class CompileFailed(RuntimeError):
    """torch.compile could not compile the training step in a mode the user asked for by name."""

    def __init__(self, mode: str, error: BaseException) -> None:
        super().__init__(
            f"--compile {mode}: torch.compile could not compile the training step: {describe(error)}; "
            "run with --compile off (eager) or --compile auto"
        )


def describe(error: BaseException) -> str:
    """The failure's first line, and for a graph break the user code that caused it (file:line: code)."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    frames = getattr(error, "real_stack", None) or []
    where = " <- ".join(
        f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}" for frame in frames[:3]
    )
    return f"{first_line} ({type(error).__name__}{', at ' + where if where else ''})"


def resolve_compile_mode(requested: str, device: torch.device | str, zero_stage: int) -> str:
    """The mode to run: ``off``, ``default`` or ``cudagraphs``; raises where a named mode cannot work."""
    if requested not in COMPILE_MODES:
        raise ValueError(f"--compile {requested!r} is not one of {COMPILE_MODES}")
    device = torch.device(device)
    problem = None
    if not hasattr(torch, "compile"):
        problem = f"torch {torch.__version__} has no torch.compile"
    elif zero_stage == 3:
        problem = "ZeRO-3 gathers each module's parameters in hooks that a full graph cannot hold"
    elif requested == CUDAGRAPHS and device.type != "cuda":
        problem = f"CUDA graphs need a CUDA GPU; this run is on {device.type}"
    if requested == AUTO:
        if problem is not None or device.type != "cuda":
            logger.info(
                "--compile auto: eager on %s (%s)", device.type, problem or "compiling pays off on GPUs"
            )
            return OFF
        return DEFAULT
    if requested != OFF and problem is not None:
        raise ValueError(f"--compile {requested}: {problem}; use --compile off or --compile auto")
    return requested


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's (graph breaks under fullgraph, backend and C++ compiler
    errors all derive from TorchDynamoException). torch._dynamo is imported here, not at module
    import: it imports Triton, whose kernels' mode (compiled or interpreted) is then fixed."""
    import torch._dynamo.exc

    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


def compile_step(function: Callable[..., Any], mode: str) -> Callable[..., Any] | None:
    """``function`` compiled as one static-shape graph, or None for eager (``off``)."""
    if mode == OFF:
        return None
    import torch._dynamo.config

    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    options = {"mode": "reduce-overhead"} if mode == CUDAGRAPHS else {}
    return torch.compile(function, fullgraph=True, dynamic=False, **options)


def report_fallback(error: BaseException) -> None:
    """``--compile auto`` could not compile: say so once, the run goes on eager."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    logger.warning(
        "--compile auto: compiling failed (%s: %s); continuing eager", type(error).__name__, first_line
    )
