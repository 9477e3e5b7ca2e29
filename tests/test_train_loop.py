"""Both entry points' ``run()`` in this process, on one gloo rank: the shared loop's behaviours
(cadence, resume, stop on a signal, non-finite losses, explicit --resume checks) hold for
pre-training and fine-tuning alike. Launched multi-rank runs are in test_pretrain.py /
test_finetune_entry.py (``make test-system``)."""

from __future__ import annotations

import json
import math
import signal
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import synthetic_task_shards

from lxtrain import convert, distributed, finetune, pretrain
from lxtrain.config import parse_args as parse_pretrain_args
from lxtrain.downstream.config import parse_args as parse_finetune_args
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate
from lxtrain.train.loop import EXIT_NONFINITE, REQUEUE_MARKER, StepHooks

REPO = Path(__file__).resolve().parent.parent
FEATURE_DIM = 16


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group for this module (DeepSpeed's engine needs one); torn down after."""
    saved_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    patch = pytest.MonkeyPatch()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        patch.setenv(key, value)
    info = distributed.init(120)
    yield info
    if dist.is_initialized():
        dist.destroy_process_group()
    distributed._control_group = None
    patch.undo()
    for signum, handler in saved_handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop_corpus")
    generate(SyntheticConfig(out=out, images=48, world=World(feature_dim=FEATURE_DIM), direct=True))
    return out / "shards"


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop_tasks")
    shards, model = synthetic_task_shards(root, images=24, sets=32, feature_dim=FEATURE_DIM)
    convert.write_lxtrain(model.state_dict(), model.config, root / "export")
    return {"shards": shards, "export": root / "export"}


class Stop:
    """A stop flag the test sets (the real one is set by SIGTERM / SIGUSR1)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None


class StopAfter(StepHooks):
    def __init__(self, stop: Stop, step: int) -> None:
        self.stop, self.step = stop, step

    def step_ends(self, step: int) -> None:
        if step == self.step:
            self.stop.signal_name = "SIGUSR1"


class NaNFrom(StepHooks):
    """Every micro-batch from ``first`` on has a NaN loss."""

    def __init__(self, first: int) -> None:
        self.first = first

    def after_forward(self, batches_done: int, output) -> None:
        if batches_done >= self.first:
            output.total = output.total * math.nan


def pretrain_cfg(corpus: Path, output: Path, *extra: str):
    return parse_pretrain_args(
        [
            "--deepspeed_config",
            str(REPO / "ds_configs" / "cpu_tiny.json"),
            "--train-shards",
            str(corpus / "train"),
            "--valid-shards",
            str(corpus / "valid"),
            "--output-dir",
            str(output),
            "--model",
            "tiny",
            "--num-workers",
            "0",
            "--log-every",
            "1",
            "--max-valid-batches",
            "1",
            *extra,
        ]
    )


def finetune_cfg(setup: dict[str, Path], output: Path, *extra: str):
    return parse_finetune_args(
        [
            "--task",
            "nlvr2",
            "--deepspeed_config",
            str(REPO / "ds_configs" / "cpu_finetune.json"),
            "--init",
            str(setup["export"]),
            "--train-shards",
            str(setup["shards"] / "nlvr2_train"),
            "--valid-shards",
            str(setup["shards"] / "nlvr2_valid"),
            "--output-dir",
            str(output),
            "--num-workers",
            "0",
            "--log-every",
            "1",
            "--lr",
            "1e-3",
            *extra,
        ]
    )


def logged_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_pretrain_run_trains_validates_saves_and_exports(one_rank, corpus, tmp_path, capsys):
    code = pretrain.run(pretrain_cfg(corpus, tmp_path, "--max-steps", "2"), one_rank, Stop())
    assert code == 0
    assert logged_steps(tmp_path) == [1, 2]
    record = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert record["loss"] and all(math.isfinite(value) for value in record["loss"].values())
    assert json.loads((tmp_path / "validation.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert (tmp_path / "checkpoints" / "step00000002" / "COMPLETE").exists()
    assert (tmp_path / "export").is_dir() and not (tmp_path / REQUEUE_MARKER).exists()
    assert "done: 2 steps" in capsys.readouterr().out


def test_finetune_run_trains_validates_and_exports_the_best(one_rank, task_setup, tmp_path, capsys):
    code = finetune.run(finetune_cfg(task_setup, tmp_path, "--max-steps", "2"), one_rank, Stop())
    assert code == 0
    assert logged_steps(tmp_path) == [1, 2]
    assert (tmp_path / "best").is_dir() and (tmp_path / "export").is_dir()
    out = capsys.readouterr().out
    assert "best validation accuracy" in out and "done: 2 steps" in out


@pytest.mark.parametrize("entry", ["pretrain", "finetune"])
def test_a_signal_saves_marks_requeue_and_the_resume_continues(one_rank, corpus, task_setup, tmp_path, entry):
    def cfg(*extra: str):
        if entry == "pretrain":
            return pretrain_cfg(corpus, tmp_path, "--save-every", "100", *extra)
        return finetune_cfg(task_setup, tmp_path, "--save-every", "100", "--no-export", *extra)

    module = pretrain if entry == "pretrain" else finetune
    stop = Stop()
    assert module.run(cfg("--max-steps", "3"), one_rank, stop, StopAfter(stop, 1)) == 0
    assert (tmp_path / REQUEUE_MARKER).read_text() == "step 1\n"
    assert (tmp_path / "checkpoints" / "step00000001" / "COMPLETE").exists()
    assert module.run(cfg("--max-steps", "3"), one_rank, Stop()) == 0
    assert logged_steps(tmp_path) == [1, 2, 3]  # resumed at step 1, not from the start
    assert not (tmp_path / REQUEUE_MARKER).exists()


@pytest.mark.parametrize("entry", ["pretrain", "finetune"])
def test_an_explicit_resume_path_must_be_a_complete_checkpoint(one_rank, corpus, task_setup, tmp_path, entry):
    half_written = tmp_path / "checkpoints" / "step00000004"
    half_written.mkdir(parents=True)
    if entry == "pretrain":
        cfg = pretrain_cfg(corpus, tmp_path, "--resume", str(half_written))
    else:
        cfg = finetune_cfg(task_setup, tmp_path, "--resume", str(half_written))
    module = pretrain if entry == "pretrain" else finetune
    with pytest.raises(FileNotFoundError, match="not a complete lxtrain checkpoint directory"):
        module.run(cfg, one_rank, Stop())
    assert not (tmp_path / "train_log.jsonl").exists()


@pytest.mark.parametrize("entry", ["pretrain", "finetune"])
def test_nonfinite_losses_are_skipped_then_stop_with_the_last_good_weights(
    one_rank, corpus, task_setup, tmp_path, entry, capsys
):
    if entry == "pretrain":
        cfg, first_bad = pretrain_cfg(corpus, tmp_path, "--max-steps", "6", "--max-bad-steps", "2"), 4
    else:
        cfg, first_bad = finetune_cfg(task_setup, tmp_path, "--max-steps", "6", "--max-bad-steps", "2"), 2
    module = pretrain if entry == "pretrain" else finetune
    # ZeRO-2 skips a non-finite step inside DeepSpeed; the loop counts it on the device.
    assert module.run(cfg, one_rank, Stop(), NaNFrom(first_bad)) == EXIT_NONFINITE
    out = capsys.readouterr().out
    assert "non-finite loss(es)" in out and "non-finite losses in a row" in out
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert saved, "the last good weights were not saved"


def test_finetune_steps_read_nothing_back_between_log_steps(one_rank, task_setup, tmp_path):
    """The fine-tuning step is as sync-free as pre-training's (tests/test_syncs.py): no host read
    from lxtrain's code during steps that are not log steps."""
    from sync_probe import CountingHooks

    hooks = CountingHooks(first_step=3, log_every=4)
    cfg = finetune_cfg(task_setup, tmp_path, "--max-steps", "8", "--log-every", "4", "--no-export")
    cfg.valid_shards = None  # validation gathers predictions on the host by design; not a step
    assert finetune.run(cfg, one_rank, Stop(), hooks) == 0
    assert hooks.counted_steps == [3, 5, 6, 7]
    assert hooks.counter.ops > 500, "the counter saw no training step"
    assert hooks.counter.reads["lxtrain"] == {}, json.dumps(hooks.counter.reads["lxtrain"], indent=1)
    assert hooks.counter.reads["other"] == {}, json.dumps(hooks.counter.reads["other"], indent=1)


def logged_losses(output: Path) -> dict[int, dict[str, float]]:
    """Per-step losses; a later record of a step (after a resume) wins."""
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


@pytest.mark.multiproc  # forks data-loader workers: in make test-system
def test_a_resume_with_another_worker_count_continues_the_same_stream(one_rank, corpus, tmp_path):
    """The data order does not depend on --num-workers: 2 steps in-process, resumed with two worker
    processes, give the uninterrupted run's per-step losses (fp32, dropout seeded per micro-batch)."""
    common = ("--save-every", "2", "--no-export", "--max-steps", "4")
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    assert pretrain.run(pretrain_cfg(corpus, straight, *common), one_rank, Stop()) == 0
    stop = Stop()
    assert pretrain.run(pretrain_cfg(corpus, switched, *common), one_rank, stop, StopAfter(stop, 2)) == 0
    resumed = pretrain_cfg(corpus, switched, *common)
    resumed.num_workers = 2
    assert pretrain.run(resumed, one_rank, Stop()) == 0
    expected, got = logged_losses(straight), logged_losses(switched)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step].keys() == expected[step].keys()
        for task, value in expected[step].items():
            assert got[step][task] == pytest.approx(value, rel=1e-5), (step, task)


def test_a_resume_that_would_change_the_data_order_is_refused_naming_the_flag(one_rank, corpus, tmp_path):
    common = ("--no-export", "--max-steps", "1")
    assert pretrain.run(pretrain_cfg(corpus, tmp_path, *common), one_rank, Stop()) == 0
    changed = pretrain_cfg(corpus, tmp_path, "--no-export", "--max-steps", "2", "--data-interleave", "4")
    with pytest.raises(ValueError, match=r"interleave was 2, is 4.*--data-interleave 2"):
        pretrain.run(changed, one_rank, Stop())
    assert logged_steps(tmp_path) == [1]  # nothing trained on the other order


def test_a_finetuning_resume_on_another_order_is_refused_naming_the_flag(one_rank, task_setup, tmp_path):
    assert (
        finetune.run(finetune_cfg(task_setup, tmp_path, "--max-steps", "1", "--no-export"), one_rank, Stop())
        == 0
    )
    changed = finetune_cfg(task_setup, tmp_path, "--max-steps", "2", "--no-export", "--seed", "7")
    with pytest.raises(ValueError, match=r"seed was \d+, is 7.*run with --seed"):
        finetune.run(changed, one_rank, Stop())
    assert logged_steps(tmp_path) == [1]
