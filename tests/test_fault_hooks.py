"""Fault injection lives in lxtrain.testing, behind StepHooks; the production path never reads it.

The full runs that inject these faults (kill -9 mid-run and while saving, NaN losses) are in
``tests/test_pretrain.py`` and ``tests/test_faults.py``; here the pieces are checked in one
process, or one short subprocess where the fault is a SIGKILL.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lxtrain.tasks.objectives import ObjectiveOutput
from lxtrain.testing import faults
from lxtrain.testing.fault_hooks import FAULT_LOG_PREFIX, FaultHooks
from lxtrain.train.loop import StepHooks

PACKAGE = faults.REPO / "lxtrain"
TESTING = PACKAGE / "testing"


def _production_sources() -> list[Path]:
    sources = [path for path in PACKAGE.rglob("*.py") if TESTING not in path.parents]
    assert PACKAGE / "pretrain.py" in sources and PACKAGE / "checkpoint.py" in sources
    return sources


def test_production_code_reads_no_fault_variable_and_imports_no_testing_module():
    for path in _production_sources():
        text = path.read_text()
        assert "LXTRAIN_FAULT" not in text, f"{path} mentions an LXTRAIN_FAULT_* variable"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            assert not any(m.startswith("lxtrain.testing") for m in modules), f"{path}:{node.lineno}"


def test_from_environ_reads_lists_and_rank_and_refuses_a_typo():
    hooks = FaultHooks.from_environ(
        {
            "LXTRAIN_FAULT_SIGKILL_AT_STEP": "5",
            "LXTRAIN_FAULT_SIGKILL_IN_SAVE": " 2, 4 ,",
            "LXTRAIN_FAULT_NAN_AT_BATCH": "6,7",
            "LXTRAIN_FAULT_RANK": "1",
        }
    )
    assert hooks == FaultHooks(frozenset({5}), frozenset({2, 4}), frozenset({6, 7}), rank=1)
    assert FaultHooks.from_environ({"LXTRAIN_FAULT_RANK": ""}) == FaultHooks()
    with pytest.raises(ValueError, match=r"LXTRAIN_FAULT_NAN_AT_BATCH='6,seven': 'seven'"):
        FaultHooks.from_environ({"LXTRAIN_FAULT_NAN_AT_BATCH": "6,seven"})
    with pytest.raises(ValueError, match=r"LXTRAIN_FAULT_RANK='one'"):
        FaultHooks.from_environ({"LXTRAIN_FAULT_RANK": "one"})


def test_nan_hook_hits_only_the_chosen_micro_batch_on_the_chosen_rank(capsys):
    weight = torch.ones(3, requires_grad=True)
    total = (weight * 2.0).sum()
    output = ObjectiveOutput(losses={}, total=total, correct={}, counts={})
    StepHooks().after_forward(3, output)  # the production default
    FaultHooks(nan_at_batch=frozenset({3})).after_forward(2, output)
    FaultHooks(nan_at_batch=frozenset({3}), rank=1).after_forward(3, output)  # this process is rank 0
    assert output.total is total and capsys.readouterr().out == ""

    FaultHooks(nan_at_batch=frozenset({3}), rank=0).after_forward(3, output)
    assert torch.isnan(output.total)
    line = capsys.readouterr().out
    assert line.startswith(f"{FAULT_LOG_PREFIX} NaN loss at micro-batch 3 at ")
    assert faults.FAULT_LINE.search(line)  # the suite times the detection from it
    # The NaN reaches the gradients, as a real overflow's would.
    output.total.backward()
    assert torch.isnan(weight.grad).all()


@pytest.mark.parametrize(
    "hooks, calls, killed_by",
    [
        (
            "FaultHooks(sigkill_at_step=frozenset({5}))",
            ["before_checkpoint_complete(5)", "step_logged(4)", "step_logged(5)"],
            "SIGKILL rank 0 after step 5",
        ),
        (
            "FaultHooks(sigkill_in_save=frozenset({4}), rank=0)",
            ["step_logged(4)", "before_checkpoint_complete(2)", "before_checkpoint_complete(4)"],
            "SIGKILL rank 0 while saving step 4",
        ),
    ],
    ids=["after-step", "in-save"],
)
def test_kill_hooks_sigkill_the_process_at_their_point_only(hooks, calls, killed_by):
    script = "\n".join(
        [
            "from lxtrain.testing.fault_hooks import FaultHooks",
            f"hooks = {hooks}",
            *[f"hooks.{call}; print('survived {call}', flush=True)" for call in calls],
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=faults.REPO, timeout=120
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"survived {call}" for call in calls[:-1]]
    assert f"{FAULT_LOG_PREFIX} {killed_by} at " in result.stderr
    assert faults.FAULT_LINE.search(result.stderr)


def test_fault_runs_launch_the_fault_entry_and_others_the_production_one(tmp_path):
    assert faults.entry_for({"LXTRAIN_FAULT_NAN_AT_BATCH": "3"}) == faults.FAULT_ENTRY
    assert faults.entry_for({"MASTER_PORT": "29600"}) == faults.ENTRY
    corpus = tmp_path / "corpus"
    command = faults.pretrain_command(corpus, tmp_path / "out", entry=faults.FAULT_ENTRY)
    assert command[:6] == ["deepspeed", "--num_gpus", "2", "--master_port", "29610", faults.FAULT_ENTRY]
    python = faults.pretrain_command(corpus, tmp_path / "out", launcher="python")
    assert python[:2] == [sys.executable, faults.ENTRY]
    assert Path(faults.FAULT_ENTRY).is_file()


def test_fault_entry_runs_as_a_file_and_stops_on_a_malformed_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, faults.FAULT_ENTRY, "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # run as a file from elsewhere, as the launchers run it
        env=faults.pretrain_env({"LXTRAIN_FAULT_SIGKILL_AT_STEP": "5x"}),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pretrain_with_faults.py: error: LXTRAIN_FAULT_SIGKILL_AT_STEP='5x'" in result.stderr
    assert not (tmp_path / "out").exists()
