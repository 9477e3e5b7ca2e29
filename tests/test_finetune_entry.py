"""The real fine-tuning entry point, run as users run it (fresh processes, gloo on CPU), then evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synthetic_task_shards

from lxtrain import convert
from lxtrain.evaluate import evaluate
from lxtrain.synthetic.pretraining import all_answers

REPO = Path(__file__).resolve().parent.parent
ENTRY = str(REPO / "lxtrain" / "finetune.py")
FEATURE_DIM = 16
pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Task shards plus a 'pre-training run': an lxtrain export whose run_config names its shards."""
    root = tmp_path_factory.mktemp("finetune_entry")
    shards, model = synthetic_task_shards(root, images=40, sets=32, feature_dim=FEATURE_DIM)
    answers = [a["ans"] for a in all_answers()]
    pre_shards = root / "pre_shards"
    pre_shards.mkdir()
    (pre_shards / "index.json").write_text(json.dumps({"answers": {"list": answers}}))
    run = root / "pretrain"
    (run).mkdir()
    (run / "run_config.json").write_text(json.dumps({"lxtrain": {"train_shards": str(pre_shards)}}))
    convert.write_lxtrain(model.state_dict(), model.config, run / "export")
    convert.write_hf(model.state_dict(), model.config, root / "hf")
    return {"shards": shards, "export": run / "export", "hf": root / "hf"}


def finetune(
    task: str,
    init: Path,
    train: Path,
    valid: Path,
    output: Path,
    *args: str,
    ranks: int = 1,
    port: int = 29631,
) -> subprocess.CompletedProcess:
    flags = [
        "--task",
        task,
        "--deepspeed_config",
        str(REPO / "ds_configs" / "cpu_finetune.json"),
        "--init",
        str(init),
        "--train-shards",
        str(train),
        "--valid-shards",
        str(valid),
        "--output-dir",
        str(output),
        "--log-every",
        "1",
        "--num-workers",
        "0",
        "--lr",
        "1e-3",
        *args,
    ]
    command = (
        [sys.executable, ENTRY]
        if ranks == 1
        else ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), ENTRY]
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    return subprocess.run([*command, *flags], capture_output=True, text=True, cwd=REPO, env=env, timeout=400)


def test_vqa_single_process_from_an_lxtrain_export(setup, tmp_path):
    shards = setup["shards"]
    result = finetune(
        "vqa",
        setup["export"],
        shards / "vqa_train",
        shards / "vqa_minival",
        tmp_path,
        "--epochs",
        "1",
        port=29632,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The QA head came from the run's own answer table (found through run_config.json).
    assert "answers initialised from the pre-training QA head, 2 zero-initialised" in result.stdout
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and all(
        r["loss"] == r["loss"] for r in log
    )
    validation = json.loads((tmp_path / "validation.jsonl").read_text().splitlines()[-1])
    assert 0 <= validation["accuracy"] <= 1 and validation["count"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/accuracy", "train/lr", "valid/accuracy"} <= set(events.Tags()["scalars"])

    for split in ("vqa_minival", "vqa_test"):
        scored = evaluate(str(tmp_path / "best"), str(shards / split), tmp_path / split, num_workers=0)
        assert (tmp_path / split / "vqa_submission.json").exists()
        assert (scored["metrics"] is None) == (split == "vqa_test")
    again = evaluate(str(tmp_path / "best"), str(shards / "vqa_minival"), tmp_path / "again", num_workers=0)
    assert again["metrics"]["accuracy"] == pytest.approx(
        validation["accuracy"]
    )  # same numbers, two code paths


def test_nlvr2_two_ranks_from_an_hf_directory(setup, tmp_path):
    shards = setup["shards"]
    result = finetune(
        "nlvr2",
        setup["hf"],
        shards / "nlvr2_train",
        shards / "nlvr2_valid",
        tmp_path,
        "--max-steps",
        "2",
        ranks=2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout and "backbone from" in result.stdout and "(hf)" in result.stdout
    log = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2]
    # Validation gathered both ranks' predictions: every validation example was scored once.
    validation = json.loads((tmp_path / "validation.jsonl").read_text().splitlines()[-1])
    scored = evaluate(str(tmp_path / "export"), str(shards / "nlvr2_valid"), tmp_path / "eval", num_workers=0)
    assert validation["count"] == scored["metrics"]["count"] == scored["examples"]
    assert {"accuracy", "consistency"} <= set(scored["metrics"])
    lines = (tmp_path / "eval" / "nlvr2_predictions.csv").read_text().splitlines()
    assert len(lines) == scored["examples"] and all(
        line.rsplit(",", 1)[1] in ("True", "False") for line in lines
    )


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(setup, tmp_path):
    shards = setup["shards"]
    common = ("nlvr2", setup["export"], shards / "nlvr2_train", shards / "nlvr2_valid", tmp_path)
    first = finetune(*common, "--max-steps", "1", "--no-export", port=29633)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = finetune(*common, "--max-steps", "2", port=29633)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 1" in second.stdout
    log = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


FAULTED_FINETUNE = """
import sys
from lxtrain import finetune
from lxtrain.testing.fault_hooks import FaultHooks
sys.exit(finetune.main(sys.argv[1:], hooks=FaultHooks.from_environ()))
"""


def test_a_dead_rank_stops_the_surviving_rank_naming_the_lost_peer(setup, tmp_path):
    """Two ranks started by hand (no launcher that would kill the survivor): rank 1 is killed after
    step 1, and rank 0 leaves the stop-flag exchange with the lost-peer diagnosis instead of hanging
    (the shared loop gives fine-tuning pre-training's handling)."""
    shards = setup["shards"]
    flags = [
        "--task", "nlvr2",
        "--deepspeed_config", str(REPO / "ds_configs" / "cpu_finetune.json"),
        "--init", str(setup["export"]),
        "--train-shards", str(shards / "nlvr2_train"),
        "--output-dir", str(tmp_path),
        "--num-workers", "0",
        "--max-steps", "4",
        "--no-export",
        "--collective-timeout-s", "30",
    ]  # fmt: skip
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29634", LXTRAIN_FAULT_SIGKILL_AT_STEP="1")
    base["LXTRAIN_FAULT_RANK"] = "1"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", FAULTED_FINETUNE, *flags],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert ranks[1].returncode == -9, outputs[1][1][-2000:]
    assert ranks[0].returncode != 0
    # Where it notices depends on timing (the stop-flag exchange, or DeepSpeed's reduction of the
    # next step); either way one diagnosis names the lost peer and the way to continue.
    error = outputs[0][1]
    assert "[rank 0] error: rank 0: lost contact with another rank" in error, error[-3000:]
    assert "rerun with --resume auto" in error
