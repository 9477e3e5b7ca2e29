"""Pre-training with every host-reading tensor op of steady-state steps recorded (tests/test_syncs.py).

    python tests/sync_probe.py --first-step 2 --deepspeed_config ... (pretrain.py's flags)

Runs ``lxtrain.pretrain.run`` as the entry point does, with ``StepHooks`` that switch a
``TorchDispatchMode`` on for each step from ``--first-step`` on that is not a log step (log
steps read metrics back on purpose). An op that makes the host wait for the device is recorded
with the innermost Python frame outside torch that issued it: lxtrain's own code, DeepSpeed's, or
other. Each rank writes ``host_reads.rank<N>.json`` into the output directory.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lxtrain import distributed  # noqa: E402
from lxtrain.config import parse_args  # noqa: E402
from lxtrain.pretrain import run  # noqa: E402
from lxtrain.train.loop import StepHooks, StopRequested  # noqa: E402

aten = torch.ops.aten
# Ops whose result the host must read from the device before it can go on.
READS_ALWAYS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    aten.is_nonzero.default,  # `if tensor:`
    aten.nonzero.default,  # output shape depends on the data
    aten.masked_select.default,
}
# Ops that read the host only when indexed with a boolean mask (shape depends on the data).
READS_WITH_BOOL_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _bool_indexed(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(index) and index.dtype == torch.bool for index in indices or ())


def _caller() -> tuple[str, str]:
    """(owner, "file:line function") of the innermost frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(TORCH_DIR) and path != __file__:
            where = f"{path}:{frame.f_lineno} {frame.f_code.co_name}"
            if "/deepspeed/" in path:
                return "deepspeed", where
            if path.startswith(str(REPO / "lxtrain")):
                return "lxtrain", where
            return "other", where
        frame = frame.f_back
    return "other", "?"


class HostReadCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, Counter] = {"lxtrain": Counter(), "deepspeed": Counter(), "other": Counter()}
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in READS_ALWAYS or (func in READS_WITH_BOOL_INDEX and _bool_indexed(args)):
            owner, where = _caller()
            self.reads[owner][f"{func} at {where}"] += 1
        return func(*args, **(kwargs or {}))


class CountingHooks(StepHooks):
    """Counts during steps ``first_step`` and later that are not log steps."""

    def __init__(self, first_step: int, log_every: int) -> None:
        self.counter = HostReadCounter()
        self.first_step, self.log_every = first_step, log_every
        self.counted_steps: list[int] = []
        self.active = False

    def step_begins(self, step: int) -> None:
        upcoming = step + 1
        if upcoming >= self.first_step and upcoming % self.log_every != 0:
            self.counter.__enter__()
            self.active = True

    def step_ends(self, step: int) -> None:
        if self.active:
            self.counter.__exit__(None, None, None)
            self.active = False
            self.counted_steps.append(step)


def main(argv: list[str]) -> int:
    first_step = int(argv[argv.index("--first-step") + 1])
    argv = argv[: argv.index("--first-step")] + argv[argv.index("--first-step") + 2 :]
    cfg = parse_args(argv)
    stop = StopRequested()
    info = distributed.init(cfg.collective_timeout_s)
    hooks = CountingHooks(first_step, cfg.log_every)
    code = run(cfg, info, stop, hooks)
    report = {
        "exit": code,
        "counted_steps": hooks.counted_steps,
        "ops": hooks.counter.ops,
        "reads": {owner: dict(found) for owner, found in hooks.counter.reads.items()},
    }
    (Path(cfg.output_dir) / f"host_reads.rank{info.rank}.json").write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
