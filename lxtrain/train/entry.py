"""The command-line start of a training entry point: parse, install the signal handlers, start the
process group, route library output, run, and turn an error into the same message on every rank."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lxtrain import console, distributed
from lxtrain import engine as engine_setup
from lxtrain.train.loop import StepHooks, StopRequested

Run = Callable[[Any, distributed.DistributedInfo, StopRequested, StepHooks | None], int]


def main(
    prog: str,
    parse_args: Callable[[list[str] | None], Any],
    run: Run,
    argv: list[str] | None = None,
    hooks: StepHooks | None = None,
) -> int:
    """Run ``run(cfg, info, stop, hooks)`` as the entry point ``prog``; the process's exit code."""
    try:
        cfg = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    # Handlers go in before the slow start-up (imports, engine, resume): a pre-emption signal that
    # arrives then still ends in a requeue rather than a lost job.
    stop = StopRequested()
    # Before distributed.init: DeepSpeed's process-group start-up already logs on every rank.
    info = distributed.discover()
    console.route_library_output(cfg.output_dir, info.rank, cfg.verbose)
    info = distributed.init(cfg.collective_timeout_s, info)
    try:
        return run(cfg, info, stop, hooks)
    except (ValueError, FileNotFoundError, RuntimeError, engine_setup.ConfigError) as error:
        if distributed.is_lost_peer_error(error):  # a collective inside DeepSpeed (backward, step, save)
            distributed.fail_all(distributed.lost_peer_message(error, "in a collective"))
        # The same message on every rank that hits it; os._exit so no rank waits in a collective.
        distributed.fail_all(str(error))
    return 1
