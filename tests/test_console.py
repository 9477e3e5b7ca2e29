"""A clean console: library INFO/WARNING output and Python warnings go to the run's per-rank log
file, errors and lxtrain's own warnings still reach the console, and --verbose shows everything."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator

import pytest
from deepspeed.utils.logging import logger as deepspeed_logger
from deepspeed.utils.logging import set_log_level_from_string

from lxtrain.console import LIBRARY_LOGGERS, log_path, route_library_output
from lxtrain.demo import LIBRARY_LINE


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """route_library_output changes process-wide logging: put it back for the other tests."""
    names = ["", *(n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARY_LOGGERS)]
    saved = {
        name: (list(logger.handlers), logger.propagate, logger.level)
        for name in names
        for logger in [logging.getLogger(name)]
    }
    streams = {
        handler: handler.stream
        for handlers, _, _ in saved.values()
        for handler in handlers
        if isinstance(handler, logging.StreamHandler)
    }
    yield
    for handler, stream in streams.items():
        handler.stream = stream  # not setStream: it would flush the capture stream, closed by now
    logging.captureWarnings(False)
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


def _libraries_print_to_this_console() -> None:
    """Point DeepSpeed's and torch's own console handlers at the streams the test captures: they
    were made at import, under pytest's collection capture, where a leak would go unseen."""
    for name in LIBRARY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(sys.stdout if handler.stream.name == "<stdout>" else sys.stderr)


def _emit(tag: str) -> None:
    """One of each kind of output a run produces, each line tagged to find it."""
    # As a DeepSpeed JSON with "log_level": "info" does it: level set on the logger and its handlers.
    set_log_level_from_string("info")
    deepspeed_logger.info(f"{tag} ds-info")
    deepspeed_logger.warning(f"{tag} ds-warning")
    logging.getLogger("torch.distributed").warning(f"{tag} torch-warning")
    warnings.warn(f"{tag} future", FutureWarning, stacklevel=1)
    deepspeed_logger.error(f"{tag} ds-error")
    logging.getLogger("lxtrain.data").warning(f"{tag} lxtrain-warning")


def test_library_output_goes_to_the_rank_log_and_only_errors_to_the_console(tmp_path, capfd):
    _libraries_print_to_this_console()
    path = route_library_output(tmp_path / "run", rank=3, verbose=False)
    assert path == tmp_path / "run" / "logs" / "rank3.log" == log_path(tmp_path / "run", 3)
    _emit("quiet")
    out, err = capfd.readouterr()
    logged = path.read_text()
    for kind in ("ds-info", "ds-warning", "torch-warning", "future", "ds-error"):
        assert f"quiet {kind}" in logged, kind
    for kind in ("ds-info", "ds-warning", "torch-warning", "future"):
        assert f"quiet {kind}" not in out + err, kind
    assert "FutureWarning" in logged
    assert "quiet ds-error" in err and "quiet ds-error" not in out
    assert "quiet lxtrain-warning" in err  # lxtrain's own warnings stay on the console


def test_verbose_shows_library_output_on_the_console_and_still_logs_it(tmp_path, capfd):
    path = route_library_output(tmp_path / "run", rank=0, verbose=True)
    _emit("loud")
    out, err = capfd.readouterr()
    logged = path.read_text()
    for kind in ("ds-info", "ds-warning", "torch-warning", "future", "ds-error"):
        assert f"loud {kind}" in err, kind
        assert f"loud {kind}" in logged, kind


def test_a_second_call_moves_the_routing_instead_of_doubling_it(tmp_path, capfd):
    _libraries_print_to_this_console()
    first = route_library_output(tmp_path / "a", rank=0)
    second = route_library_output(tmp_path / "b", rank=0)
    deepspeed_logger.warning("moved")
    assert "moved" not in first.read_text()
    assert second.read_text().count("moved") == 1
    assert "moved" not in "".join(capfd.readouterr())


@pytest.mark.parametrize(
    "line, library",
    [
        (
            "[2026-11-30 01:11:57,166] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}\n",
            True,
        ),
        (
            "[2026-11-30 01:11:55,673] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile\n",
            True,
        ),
        ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n", True),
        (
            "[2026-11-30 01:11:55,673] [ERROR] [launch.py:321:sigkill_handler] ... exits with return code = 1\n",
            False,
        ),
        ("step 2/2 epoch 0.20 [pretrain-no-qa] mlm=10.327 match=0.693 | 134.8 samples/s | ETA --\n", False),
        ("validation at step 2: {...}\n", False),
        ("[rank 1] error: --recipe 'p20' is not one of\n", False),
    ],
)
def test_the_demo_keeps_only_library_lines_off_the_console(line: str, library: bool):
    assert bool(LIBRARY_LINE.match(line)) is library
