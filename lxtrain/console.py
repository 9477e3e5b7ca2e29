"""A clean console: lxtrain's own lines on the console, libraries' INFO/WARNING output in a log file.

DeepSpeed logs every engine detail through its ``DeepSpeed`` logger (its own handler on stdout),
torch through the ``torch`` loggers (their own handlers on stderr), and deprecations arrive as
Python ``warnings``; on a multi-rank run each rank repeats them around the progress lines that
matter. :func:`route_library_output` sends all of it to ``OUTPUT_DIR/logs/rank<N>.log`` and keeps
only ERROR records on the console (on every rank: an error must never be hidden). lxtrain's own
``print0``/``fail_all`` lines are plain prints and are not touched; the ``lxtrain.*`` loggers keep
showing their warnings on the console, as before. ``verbose=True`` shows everything on the console
too (today's behaviour), besides the file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_DIR = "logs"
# DeepSpeed's own layout, so a line in the file reads as it did on the console.
FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s %(filename)s:%(lineno)d] %(message)s"
# Libraries that attach their own console handlers and do not propagate; everything else
# (py.warnings, matplotlib, PIL...) reaches the root logger and its handlers below.
LIBRARY_LOGGERS = ("DeepSpeed", "torch")
OWN_LOGGER = "lxtrain"


class _Routed:
    """Marks the handlers this module installs, so a second call replaces them instead of adding."""


class _RoutedFileHandler(logging.FileHandler, _Routed):
    pass


class _RoutedStreamHandler(logging.StreamHandler, _Routed):
    pass


class _ConsoleFilter(logging.Filter):
    """What reaches the console when not verbose: errors from anyone, lxtrain's own warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own and record.levelno >= logging.WARNING


def _is_library_logger(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in LIBRARY_LOGGERS)


def log_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / LOG_DIR / f"rank{rank}.log"


def route_library_output(output_dir: str | Path, rank: int, verbose: bool = False) -> Path:
    """Send library logging and Python warnings to ``OUTPUT_DIR/logs/rank<rank>.log``; returns the path.

    Call it once the output directory is known and before DeepSpeed builds the engine (the entry
    points call it first thing in ``main``). Idempotent: a second call moves the routing to the
    new file. Not caught: lines a library ``print``s itself (see README "Monitoring").
    """
    # DeepSpeed creates its logger, with a stdout handler, when it is first imported: import it now
    # so that handler exists to be taken off (its import-time accelerator line is printed before).
    import deepspeed.utils.logging  # noqa: F401
    import torch  # noqa: F401  (the same for torch's loggers)

    path = log_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(FORMAT)
    file_handler = _RoutedFileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(formatter)
    # stderr, not stdout: the console keeps stdout for progress, so errors stand apart from it.
    console_handler = _RoutedStreamHandler(sys.stderr)
    console_handler.setFormatter(formatter)
    if not verbose:
        # A filter, not a level: DeepSpeed's set_log_level_from_string (a "log_level" in the
        # DeepSpeed JSON) resets the level of every handler on its logger, never a filter.
        console_handler.addFilter(_ConsoleFilter())

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Routed)]:
        root.removeHandler(handler)
        handler.close()
    root.addHandler(file_handler)
    root.addHandler(console_handler)

    # The library loggers' own console handlers would print past the root's filter: take them off
    # and let the records propagate to the root's handlers (file always, console as filtered).
    for name in [n for n in logging.root.manager.loggerDict if _is_library_logger(n)]:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # stdout/stderr only; files a user set stay
                logger.removeHandler(handler)
        logger.propagate = True
    # The DeepSpeed logger's level stays DeepSpeed's (WARNING, or the JSON's "log_level"): at INFO
    # its CPU optimizers also print from C++ straight to stdout, which no handler can route.
    # warnings.warn -> the "py.warnings" logger (WARNING) -> the root's handlers.
    logging.captureWarnings(True)
    return path
