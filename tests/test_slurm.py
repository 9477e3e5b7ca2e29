"""slurm/pretrain.sbatch on a real two-node Slurm cluster (the local one of .ci/slurm_cluster.sh).

The two nodes are network namespaces joined by a veth pair, so every collective crosses a real
link between two addresses. Skipped unless the cluster is up:

    bash .ci/slurm_cluster.sh start && source /tmp/lxtrain-slurm/env.sh
    python -m pytest -q tests/test_slurm.py
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lxtrain.testing import faults
from lxtrain.testing.faults import REPO, job_fields, job_log, submit
from lxtrain.testing.faults import step_losses as train_losses

pytestmark = pytest.mark.multiproc

JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for Slurm client commands; skips unless a cluster with two usable nodes answers."""
    env, why_not = faults.slurm_env()
    if env is None:
        pytest.skip(why_not)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic corpus in four training shards (two per node) and one validation shard."""
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run(
        [sys.executable, "-m", "lxtrain.synthetic.pretraining", "--out", str(out), "--images", "64"]
        + ["--feature-dim", "64", "--boxes", "36", "--shards", "--shard-size", "16"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out / "shards"


def wait_for_end(env: dict[str, str], job_id: str, run_dir: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    """Polls until the job is finished (not merely requeued); returns its scontrol fields."""
    try:
        return faults.wait_for_job_end(env, job_id, timeout_s)
    except TimeoutError as error:
        pytest.fail(f"{error}:\n{job_log(run_dir, job_id)}")


def test_allreduce_across_both_nodes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The harness itself: one rank per node, gloo over the veth link, every rank sees the full sum."""
    job_id = submit(
        slurm_env, tmp_path, ["--nodes=2", "--ntasks-per-node=1"], [], script="slurm/allreduce_check.py"
    )
    fields = wait_for_end(slurm_env, job_id, tmp_path, timeout_s=120)
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED", log
    lines = re.findall(r"^allreduce-check (.*)$", log, flags=re.M)
    ranks = [dict(item.split("=", 1) for item in line.split()) for line in lines]
    assert sorted(rank["rank"] for rank in ranks) == ["0", "1"], log
    assert all(rank["ok"] == "True" and rank["sum"] == "3" for rank in ranks), log
    assert len({rank["node"] for rank in ranks}) == 2, log
    # Each rank bound the interface holding its own node's address, and the addresses differ.
    assert len({rank["addr"] for rank in ranks}) == 2 and all(rank["ifname"] for rank in ranks), log
    master = re.search(r"master (\S+):(\d+)", log)
    assert master and master.group(1) in {rank["addr"] for rank in ranks}, log


def test_pretrain_two_nodes(slurm_env: dict[str, str], shards: Path, tmp_path: Path) -> None:
    """A few real pre-training steps, one rank on each node: finite losses, checkpoint, clean exit."""
    job_id = submit(
        slurm_env,
        tmp_path,
        ["--nodes=2", "--ntasks-per-node=1"],
        ["--max-steps", "4", "--log-every", "1", "--max-valid-batches", "1"],
        ds_config="ds_configs/cpu_tiny.json",
        train_shards=shards / "train",
        valid_shards=shards / "valid",
        model="tiny",
    )
    fields = wait_for_end(slurm_env, job_id, tmp_path)
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED", log
    assert "2 rank(s) via slurm" in log, log
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4], log
    assert all(math.isfinite(value) for step in losses.values() for value in step.values()), losses
    assert (tmp_path / "checkpoints" / "latest").exists()
    assert not (tmp_path / "REQUEUE").exists()


def test_preemption_signal_requeues_and_resumes(
    slurm_env: dict[str, str], shards: Path, tmp_path: Path
) -> None:
    """Slurm's pre-timeout signal (B:USR1, sent here at once with scancel) -> checkpoint -> REQUEUE
    marker -> `scontrol requeue` -> the same job id starts again and resumes to the last step."""
    max_steps = 20
    job_id = submit(
        slurm_env,
        tmp_path,
        ["--nodes=2", "--ntasks-per-node=1"],
        ["--max-steps", str(max_steps), "--log-every", "1", "--save-every", "1000", "--no-export"],
        ds_config="ds_configs/cpu_tiny.json",
        train_shards=shards / "train",
        model="tiny",
    )
    # Signal once training has started: before that the ranks have no handler yet.
    log_path = tmp_path / "train_log.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (log_path.exists() and log_path.read_text().strip()):
        assert time.monotonic() < deadline, job_log(tmp_path, job_id)
        assert job_fields(slurm_env, job_id)["JobState"] in {"PENDING", "RUNNING"}, job_log(tmp_path, job_id)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True, timeout=30)
    fields = wait_for_end(slurm_env, job_id, tmp_path)
    log = job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "1", log
    assert "got SIGUSR1" in log and f"requeueing job {job_id}" in log, log
    saved_at = re.search(r"checkpoint saved at step (\d+) \(signal", log)
    assert saved_at and 1 <= int(saved_at.group(1)) < max_steps, log
    assert "restart 1" in log, log
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, max_steps + 1)), log
    assert all(math.isfinite(value) for step in losses.values() for value in step.values()), losses


def test_requeued_on_one_node_continues_the_two_node_run_exactly(
    slurm_env: dict[str, str], shards: Path, tmp_path: Path
) -> None:
    """Elastic requeue (issue #16): a job on 2 nodes is requeued held (what pre-emption does: SIGTERM,
    the ranks checkpoint), shrunk to 1 node with `scontrol update` while pending, released: the same
    job id resumes on 1 rank through DeepSpeed's universal checkpoint and logs the losses of an
    uninterrupted 2-node job. slurm/pretrain.sbatch is submitted unchanged; ds_configs/cpu_tiny.json's
    global batch (16 of micro 8) is 2 micro-batches per step on 2 ranks or 1 (accumulation 2)."""
    max_steps = 12
    args = ["--max-steps", str(max_steps), "--log-every", "1", "--save-every", "2", "--no-export"]
    args += ["--num-workers", "0"]
    variables = dict(ds_config="ds_configs/cpu_tiny.json", train_shards=shards / "train", model="tiny")
    two_nodes = ["--nodes=2", "--ntasks-per-node=1"]
    reference_dir, elastic_dir = tmp_path / "reference", tmp_path / "elastic"
    # Both jobs at once: each holds one CPU per node, and the cluster's nodes have two.
    reference = submit(slurm_env, reference_dir, two_nodes, args, **variables)
    job_id = submit(slurm_env, elastic_dir, two_nodes, args, **variables)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while max(train_losses(elastic_dir), default=0) < 2:
        assert time.monotonic() < deadline, job_log(elastic_dir, job_id)
        assert job_fields(slurm_env, job_id)["JobState"] in {"PENDING", "RUNNING"}, job_log(
            elastic_dir, job_id
        )
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeuehold", job_id], env=slurm_env, check=True, timeout=30)
    while (fields := job_fields(slurm_env, job_id))["JobState"] != "PENDING":
        assert time.monotonic() < deadline, (fields, job_log(elastic_dir, job_id))
        time.sleep(0.2)
    # NumTasks too: with --ntasks-per-node=1 Slurm keeps 2 nodes for 2 tasks otherwise.
    update = [f"JobId={job_id}", "NumNodes=1", "NumTasks=1"]
    subprocess.run(["scontrol", "update", *update], env=slurm_env, check=True, timeout=30)
    subprocess.run(["scontrol", "release", job_id], env=slurm_env, check=True, timeout=30)
    fields = wait_for_end(slurm_env, job_id, elastic_dir)
    log = job_log(elastic_dir, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log
    assert fields["NumNodes"] == "1", fields
    assert "2 rank(s) via slurm" in log and "1 rank(s) via slurm" in log, log
    # The requeued batch script still has the submission's SLURM_NTASKS=2; it starts 1 rank.
    assert "the submission 2: starting 1 rank(s)" in log, log
    # From the pre-emption's checkpoint (SIGTERM), or the periodic one before it should Slurm's
    # KillWait (5 s here) end the ranks first: either way no step before it is redone.
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed_at and 2 <= int(resumed_at.group(1)) < max_steps, log
    assert re.search(r"written on 2 DP rank\(s\) with ZeRO-2, loading on 1 with ZeRO-2", log), log
    assert wait_for_end(slurm_env, reference, reference_dir)["JobState"] == "COMPLETED"
    expected, got = train_losses(reference_dir), train_losses(elastic_dir)
    assert sorted(got) == sorted(expected) == list(range(1, max_steps + 1)), log
    worst = max(faults.max_relative_difference(got[step], expected[step]) for step in expected)
    assert worst <= 1e-5, {step: (got[step], expected[step]) for step in expected}


STAND_IN = """
import argparse, os, pathlib, signal, sys, time

# Behaves like pretrain.py on a signal: rank 0 writes the REQUEUE marker, every rank exits 0.
parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", type=pathlib.Path)
args, _ = parser.parse_known_args()

def stop(signum, frame):
    if os.environ["SLURM_PROCID"] == "0":
        (args.output_dir / "REQUEUE").write_text("stand-in")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
print("stand-in running", flush=True)
time.sleep(120)
"""


def test_cancelled_job_is_not_requeued(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """scancel sends SIGTERM, the ranks checkpoint and leave the marker, and the job stays cancelled
    (Slurm itself would accept `scontrol requeue` on the cancelled job)."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    run_dir = tmp_path / "run"
    job_id = submit(slurm_env, run_dir, ["--nodes=2", "--ntasks-per-node=1"], [], script=script)
    deadline = time.monotonic() + 60
    while job_log(run_dir, job_id).count("stand-in running") < 2:
        assert time.monotonic() < deadline, job_log(run_dir, job_id)
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=slurm_env, check=True, timeout=30)
    # The job record says CANCELLED at once; the batch script decides a moment later.
    deadline = time.monotonic() + 60
    while "requeueing" not in (log := job_log(run_dir, job_id)):
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
    assert "not requeueing" in log, log
    time.sleep(2)  # a requeue would show as PENDING by now
    fields = job_fields(slurm_env, job_id)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", log
