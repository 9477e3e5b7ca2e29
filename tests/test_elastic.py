"""Elastic resume end to end (issue #16, "Must hold"): real launched runs that change world size.

With the global batch fixed (``train_batch_size`` 12, micro-batch 2: M = 6 micro-batches per
optimiser step, which 1, 2 and 3 ranks divide), a run that goes

    2 ranks -> kill -9 after step 3 (newest checkpoint: step 2) -> 1 rank to step 4 -> 3 ranks to step 6

logs the same per-step losses as an uninterrupted 2-rank run, to 1e-5 relative (fp32, gloo), for
ZeRO-2 and ZeRO-3. Every phase launches ``lxtrain/pretrain.py`` (the kill through
``lxtrain/testing/pretrain_with_faults.py``, the same run with the fault hooks), so the model and
optimiser state crosses the world sizes through DeepSpeed's universal checkpoint
(``lxtrain.checkpoint.load``), the data position through the world-independent stream
(``lxtrain.data.loader``) and dropout through the per-micro-batch seeds of ``lxtrain.train.loop``.

A resume on the same two ranks with another ``--num-workers`` (0 -> 2) continues the same losses.
That the sample ids of an epoch are each seen once across such switches is checked at the loader
level, for this run's layouts, in ``tests/test_data_streams.py``: a launched run does not expose
its sample ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lxtrain import checkpoint
from lxtrain.testing.fault_hooks import FAULT_SIGKILL_AT_STEP
from lxtrain.testing.faults import (
    REPO,
    RunResult,
    make_corpus,
    max_relative_difference,
    run_pretrain,
    step_losses,
)

pytestmark = pytest.mark.multiproc

TRAIN_BATCH, MICRO_BATCH = 12, 2  # M = 6 micro-batches per step: accumulation 6, 3, 2 on 1, 2, 3 ranks
STEPS = 6
KILL_AFTER = 3  # logged, then kill -9 before its checkpoint: the resume redoes it from step 2
TOLERANCE = 1e-5  # relative; the all-reduce order differs between world sizes, so not bit-exact


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images (~160 sentences: ~13 steps of 12 per epoch), no validation shards used."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def ds_config(directory: Path, stage: int) -> Path:
    """ds_configs/cpu_tiny.json (fp32, Adam, warm-up/decay) with a global batch 1, 2 and 3 ranks divide."""
    config = json.loads((REPO / "ds_configs" / "cpu_tiny.json").read_text())
    config["train_batch_size"] = TRAIN_BATCH
    config["train_micro_batch_size_per_gpu"] = MICRO_BATCH
    config["zero_optimization"]["stage"] = stage
    path = directory / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def launch(
    corpus: Path,
    output: Path,
    config: Path,
    ranks: int,
    port: int,
    *extra: str,
    workers: int = 0,
    env: dict[str, str] | None = None,
) -> RunResult:
    """One phase: ``ranks`` gloo ranks (the deepspeed launcher; one rank runs as a plain process)."""
    result = run_pretrain(
        corpus,
        output,
        "--max-steps",
        str(STEPS),
        "--save-every",
        "2",
        "--no-export",
        *extra,
        "--num-workers",
        str(workers),  # after pretrain_command's own --num-workers: argparse keeps the last
        config=str(config),
        ranks=ranks,
        launcher="deepspeed" if ranks > 1 else "python",
        port=port,
        validation=False,
        env=env,
        timeout=300,
    )
    return result


def assert_same_losses(output: Path, reference: Path, steps: range) -> float:
    """Every step of ``steps`` logged in both runs with equal losses; the largest relative difference."""
    got, expected = step_losses(output), step_losses(reference)
    missing = [step for step in steps if step not in got or step not in expected]
    assert not missing, (missing, sorted(got), sorted(expected))
    worst = max(max_relative_difference(got[step], expected[step]) for step in steps)
    assert worst <= TOLERANCE, {step: (got[step], expected[step]) for step in steps}
    return worst


def ok(result: RunResult) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_killed_then_one_rank_then_three_ranks_equal_the_uninterrupted_run(
    corpus: Path, tmp_path: Path, stage: int
) -> None:
    config = ds_config(tmp_path, stage)
    port = 29830 + 10 * stage
    reference = tmp_path / "reference"
    straight = launch(corpus, reference, config, 2, port)
    assert straight.returncode == 0, ok(straight)
    assert sorted(step_losses(reference)) == list(range(1, STEPS + 1))

    run = tmp_path / "elastic"
    killed = launch(corpus, run, config, 2, port + 1, env={FAULT_SIGKILL_AT_STEP: str(KILL_AFTER)})
    assert killed.returncode != 0, ok(killed)
    assert "SIGKILL rank" in killed.stderr, ok(killed)
    assert checkpoint.find_resume_tag(run / "checkpoints") == checkpoint.tag_for(2)
    assert max(step_losses(run)) == KILL_AFTER  # step 3 was logged, then lost

    one = launch(corpus, run, config, 1, port + 2, "--resume", "auto", "--max-steps", "4")
    assert one.returncode == 0, ok(one)
    assert "at step 2" in one.stdout, ok(one)
    assert "written on 2 DP rank(s) with ZeRO" in one.stdout and "loading on 1 " in one.stdout, ok(one)
    assert checkpoint.find_resume_tag(run / "checkpoints") == checkpoint.tag_for(4)

    three = launch(corpus, run, config, 3, port + 3, "--resume", "auto")
    assert three.returncode == 0, ok(three)
    assert "at step 4" in three.stdout, ok(three)
    assert "written on 1 DP rank(s) with ZeRO" in three.stdout and "loading on 3 " in three.stdout, ok(three)

    worst = assert_same_losses(run, reference, range(1, STEPS + 1))
    print(f"ZeRO-{stage}: 2 -> kill -9 -> 1 -> 3 ranks, steps 1-{STEPS}, max rel. diff {worst:.1e}")

    if stage == 2:
        # The same two ranks, another worker count: the step-2 checkpoint of the killed run
        # (written with --num-workers 0) resumed with 2 worker processes per rank.
        switched = tmp_path / "workers"
        switched.mkdir()
        tag = checkpoint.tag_for(2)
        shutil.copytree(run / "checkpoints" / tag, switched / "checkpoints" / tag)
        (switched / "checkpoints" / checkpoint.LATEST).write_text(tag + "\n")
        resumed = launch(
            corpus, switched, config, 2, port + 4, "--resume", "auto", "--max-steps", "4", workers=2
        )
        assert resumed.returncode == 0, ok(resumed)
        assert "DP rank(s)" not in resumed.stdout, ok(resumed)  # same ranks: DeepSpeed's own load
        worst = assert_same_losses(switched, reference, range(3, 5))
        print(f"ZeRO-2: 2 ranks, --num-workers 0 -> 2, steps 3-4, max rel. diff {worst:.1e}")
