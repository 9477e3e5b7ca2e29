"""A training step never makes the host wait for the device in lxtrain's own code.

The real loop (``lxtrain.pretrain.run``) runs under ``tests/sync_probe.py``, which records every
host-reading tensor op (``.item()``/``float()``/``bool()`` of a tensor, ``nonzero``, boolean-mask
indexing...) during steady-state steps that are not log steps, with the code that issued it. On a
GPU each one would stall the CPU until the queued kernels finish, so launch time adds to compute
time. DeepSpeed's own reads (the gradient-norm check of its step) are reported by name, not failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lxtrain.testing.faults import REPO, make_corpus, pretrain_command, pretrain_env

PROBE = str(Path(__file__).with_name("sync_probe.py"))
FIRST_STEP, LOG_EVERY, STEPS = 3, 4, 8  # counted: steps 3, 5, 6, 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), images=48)


def probe(corpus: Path, output: Path, ranks: int, port: int) -> list[dict]:
    launcher = "deepspeed" if ranks > 1 else "python"
    command = pretrain_command(
        corpus,
        output,
        "--max-steps",
        str(STEPS),
        "--no-export",
        ranks=ranks,
        launcher=launcher,
        port=port,
        validation=False,
        entry=PROBE,  # the probe takes pretrain.py's flags and runs its loop
    )
    command += ["--log-every", str(LOG_EVERY), "--first-step", str(FIRST_STEP)]
    env = pretrain_env({"MASTER_PORT": str(port)})
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((output / f"host_reads.rank{rank}.json").read_text()) for rank in range(ranks)]


def check(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        assert report["counted_steps"] == [3, 5, 6, 7], report["counted_steps"]
        assert report["ops"] > 1000, "the counter saw no training step"
        assert report["reads"]["lxtrain"] == {}, (
            f"rank {rank}: {json.dumps(report['reads']['lxtrain'], indent=1)}"
        )
        assert report["reads"]["other"] == {}, (
            f"rank {rank}: {json.dumps(report['reads']['other'], indent=1)}"
        )
        # Reported, not failed: what DeepSpeed's own step still reads back per step.
        print(f"rank {rank} DeepSpeed host reads over {len(report['counted_steps'])} steps:", file=sys.stderr)
        for where, count in sorted(report["reads"]["deepspeed"].items()):
            print(f"  {count:4d}  {where}", file=sys.stderr)


@pytest.mark.multiproc  # the probe is a launched process (one rank, the loop in-process with the counter)
def test_one_rank_in_process_loop_reads_nothing_back_between_log_steps(corpus, tmp_path):
    check(probe(corpus, tmp_path, ranks=1, port=29631))


@pytest.mark.multiproc
def test_two_gloo_ranks_read_nothing_back_between_log_steps(corpus, tmp_path):
    check(probe(corpus, tmp_path, ranks=2, port=29632))
