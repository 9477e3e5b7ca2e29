"""``lxtrain/pretrain.py`` with the fault hooks of the ``LXTRAIN_FAULT_*`` variables attached.

    LXTRAIN_FAULT_SIGKILL_AT_STEP=5 deepspeed --num_gpus 2 lxtrain/testing/pretrain_with_faults.py \\
        (pretrain.py's flags)

What ``lxtrain.testing.faults`` launches when a scenario injects a fault (see
``lxtrain.testing.fault_hooks`` for the variables); the production entry never reads them. It runs
as a file under the same launchers as ``lxtrain/pretrain.py`` (deepspeed, torchrun, mpirun, srun)
and takes the same flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (the launchers run a file): sys.path[0] is lxtrain/testing/ itself, whose
    # module names (faults, ...) must not shadow other packages; use the repository root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent.parent))

from lxtrain import pretrain  # noqa: E402
from lxtrain.testing.fault_hooks import FaultHooks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        hooks = FaultHooks.from_environ()
    except ValueError as error:  # a malformed variable: no run, rather than a run without its fault
        print(f"lxtrain/testing/pretrain_with_faults.py: error: {error}", file=sys.stderr)
        return 2
    return pretrain.main(argv, hooks=hooks)


if __name__ == "__main__":
    sys.exit(main())
