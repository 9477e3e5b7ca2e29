"""Faults injected into real pre-training runs: nothing executes from a file, nothing is lost.

The quicker scenarios of ``python -m lxtrain.testing.faults`` run here (same code, shorter runs); the
network cut needs the local Slurm cluster and is slow. Every multi-process run goes through the
``deepspeed`` launcher with two gloo ranks, as users run it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lxtrain import checkpoint
from lxtrain.data.shard_format import CorruptSampleError, decode_sample
from lxtrain.testing import faults

pytestmark = pytest.mark.multiproc


class WritesMarker:
    """Unpickling this calls ``Path.touch`` on the marker: code run from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------ loading never runs code


def test_safe_load_refuses_a_pickle_that_runs_code_and_names_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    for name, write in {
        "zip.pt": lambda path: torch.save({"module": WritesMarker(marker)}, path),
        "raw.pt": lambda path: path.write_bytes(pickle.dumps({"module": WritesMarker(marker)})),
    }.items():
        write(tmp_path / name)
        with pytest.raises(checkpoint.UnsafeCheckpointError, match=str(tmp_path / name)):
            checkpoint.safe_torch_load(tmp_path / name)
    assert not marker.exists()


def test_weights_only_loads_overrides_an_explicit_weights_only_false(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save(WritesMarker(marker), tmp_path / "evil.pt")
    with checkpoint.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's loaders pass
    assert not marker.exists()
    assert checkpoint.FORCE_WEIGHTS_ONLY not in os.environ  # restored afterwards


def test_resume_auto_refuses_a_checkpoint_whose_pickle_runs_code(tmp_path, corpus):
    marker = tmp_path / "code-ran"
    tag = tmp_path / "run" / "checkpoints" / checkpoint.tag_for(2)
    tag.mkdir(parents=True)
    # The writer record of a one-rank ZeRO-2 run (what the test's run uses): the load takes the
    # same-layout path and reaches the file, rather than stopping at the stage check.
    writer = {checkpoint.WRITER: {"dp_world_size": 1, "zero_stage": 2, "precision": "fp32"}}
    (tag / checkpoint.STATE).write_text(json.dumps({"step": 2, "batches_done": 4, **writer}))
    bad_file = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": WritesMarker(marker)}, bad_file)
    (tag / checkpoint.COMPLETE).write_text("")
    result = faults.run_pretrain(
        corpus, tmp_path / "run", "--max-steps", "4", "--no-export", ranks=1, launcher="python", port=29671
    )
    assert result.returncode != 0
    assert f"{bad_file}: refused to load" in result.stderr, result.stderr[-3000:]
    assert "GLOBAL" in result.stderr  # what the file asked for (here getattr, to reach Path.touch)
    assert not marker.exists()
    assert not (tmp_path / "run" / "train_log.jsonl").exists()  # not one step trained on it


def test_shard_member_holding_a_pickled_object_array_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    np.save(buffer, np.array([WritesMarker(marker)], dtype=object), allow_pickle=True)
    members = {
        "features.npy": buffer.getvalue(),
        **{f"{name}.npy": _npy(np.zeros(1)) for name in ("boxes", "objects_id", "objects_conf")},
        **{f"{name}.npy": _npy(np.zeros(1)) for name in ("attrs_id", "attrs_conf")},
        "json": b'{"img_id": "x", "img_h": 1, "img_w": 1, "sentences": []}',
    }
    with pytest.raises(CorruptSampleError, match=r"train-000003\.tar: sample 000007\.features\.npy"):
        decode_sample(members, "train-000003.tar: sample 000007")
    assert not marker.exists()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------ damaged training data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return faults.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
    "damage, names",
    [
        (faults.truncate_shard, ["unexpected end of data"]),
        (faults.corrupt_member, ["000000.features.npy", "cannot decode"]),
        (faults.wrong_feature_shape, ["sample 000000", "features (36, 16), index says (36, 32)"]),
    ],
    ids=["truncated", "corrupt-member", "wrong-shape"],
)
def test_damaged_shard_stops_every_rank_naming_shard_member_and_fix(tmp_path, corpus, damage, names):
    damaged = tmp_path / "shards"
    shutil.copytree(corpus / "train", damaged / "train")
    shard = sorted((damaged / "train").glob("*.tar"))[1]
    damage(shard)
    started = time.monotonic()
    result = faults.run_pretrain(
        damaged,
        tmp_path / "run",
        "--max-steps",
        "2",
        "--no-export",
        validation=False,
        port=29672,
        timeout=240,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert any(shard.name in line and all(n in line for n in names) for line in errors), result.stderr[-3000:]
    assert any("re-run the conversion" in line for line in errors)
    assert time.monotonic() - started < 180
    assert not (tmp_path / "run" / "checkpoints").exists() or not checkpoint.complete_tags(
        tmp_path / "run" / "checkpoints"
    )


# ------------------------------------------------------------------ checkpoint writes that fail


@pytest.fixture(scope="module")
def suite(tmp_path_factory, corpus) -> faults.Suite:
    """Four-step runs, checkpoints every two steps, and the uninterrupted reference run."""
    suite = faults.Suite(work=tmp_path_factory.mktemp("faults"), corpus=corpus, max_steps=4, port=29680)
    faults.build_reference(suite)
    return suite


def test_kill_of_the_whole_job_while_saving_resumes_from_the_previous_checkpoint(suite):
    row = faults.kill_job_in_save(suite)
    assert row.ok, row.problems
    assert "half-written step00000004 ignored" in row.happened and "resumed from step 2" in row.happened
    assert row.steps_lost == 2 and row.equal.startswith("yes (steps 3-4")


def test_kill_of_two_ranks_resumes_on_one_rank_with_the_same_losses(suite):
    row = faults.resume_on_another_world_size(suite)
    assert row.ok, row.problems
    assert "resumed from step 2 on 1 rank through DeepSpeed's universal checkpoint" in row.happened
    assert row.steps_lost == 1 and row.equal.startswith("yes (steps 3-4")


def test_disk_full_while_saving_stops_with_the_cause_and_resumes_exactly(suite):
    row = faults.disk_full_in_save(suite)
    assert row.ok, row.problems
    log = (suite.work / "disk_full" / "fault_run.log").read_text()
    failed = [line for line in log.splitlines() if "saving the checkpoint failed" in line]
    # The first rank whose write fails reports it and exits; the launcher then stops the other.
    assert failed and log.startswith("exit 1"), log[-3000:]
    assert all(str(suite.work / "disk_full" / "checkpoints" / "step00000004") in line for line in failed)
    assert all("file-size limit (ulimit -f) of 1048576 bytes" in line for line in failed)
    assert "resumed from step 2" in row.happened and row.equal.startswith("yes (steps 3-4")


@pytest.mark.slow
def test_network_cut_between_slurm_nodes_stops_then_resumes(suite):
    if faults.slurm_env()[0] is None:
        pytest.skip(faults.slurm_env()[1])
    row = faults.network_cut(suite, cut_after_step=2)
    assert row.ok, (row.happened, row.problems)
