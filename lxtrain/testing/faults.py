"""Fault-injection suite: run pre-training through its real launchers, break it, check nothing is lost.

    python -m lxtrain.testing.faults --out /tmp/faults  # every scenario, then a markdown table

Each scenario runs pre-training (tiny model, ``ds_configs/cpu_tiny.json``, two gloo ranks through
the ``deepspeed`` launcher, or ``sbatch`` on the local two-node Slurm cluster of
``.ci/slurm_cluster.sh``), injects one fault, lets the run stop (or carry on), repairs what a user
would repair, resubmits with ``--resume auto`` and compares the resumed per-step losses with an
uninterrupted run's. Every cell of the table is measured: the time from the fault to the moment
every rank has stopped (from timestamped log lines), the optimiser steps redone after the resume,
and the largest relative loss difference. The process exits non-zero if any scenario fails.

Runs launch the production entry ``lxtrain/pretrain.py``, except those whose environment sets an
``LXTRAIN_FAULT_*`` variable (a kill -9 or a NaN on cue): they launch
``lxtrain/testing/pretrain_with_faults.py``, the same run with the hooks of
``lxtrain.testing.fault_hooks``, since the production entry does not read those variables.

The helpers (launching pre-training, reading per-step losses, damaging shards, driving Slurm)
are shared with the tests (``tests/test_pretrain.py``, ``tests/test_faults.py``, ``tests/test_slurm.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lxtrain import checkpoint
from lxtrain.testing.fault_hooks import (
    FAULT_LOG_PREFIX,
    FAULT_NAN_AT_BATCH,
    FAULT_RANK,
    FAULT_SIGKILL_AT_STEP,
    FAULT_SIGKILL_IN_SAVE,
    FAULT_VARIABLE_PREFIX,
)

REPO = Path(__file__).resolve().parents[2]  # lxtrain/testing/faults.py -> the repository
ENTRY = str(REPO / "lxtrain" / "pretrain.py")  # what users launch
FAULT_ENTRY = str(REPO / "lxtrain" / "testing" / "pretrain_with_faults.py")  # ENTRY + fault hooks
ENTRY_NAMES = frozenset({Path(ENTRY).name, Path(FAULT_ENTRY).name})  # how a rank process is recognised
LOSS_TOLERANCE = 1e-6  # relative; fp32 on CPU resumes bit-exactly in practice
FAULT_LINE = re.compile(rf"{re.escape(FAULT_LOG_PREFIX)} .* at (\d+\.\d+)")
PROGRESS_LINE = re.compile(r"^step (\d+)/")
RESUMED_LINE = re.compile(r"resumed from (\S+) at step (\d+)")


# --------------------------------------------------------------------------- launching pre-training


@dataclasses.dataclass
class RunResult:
    """A finished pre-training job: exit status, both output streams and when each line arrived."""

    returncode: int
    stdout: str
    stderr: str
    lines: list[tuple[float, str]]  # (wall-clock time, line), both streams in arrival order
    started: float
    ended: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def time_of(self, pattern: str | re.Pattern, last: bool = False) -> float | None:
        """Arrival time of the first (or last) line matching ``pattern``."""
        matches = [when for when, line in self.lines if re.search(pattern, line)]
        if not matches:
            return None
        return matches[-1] if last else matches[0]

    def search(self, pattern: str | re.Pattern) -> re.Match | None:
        compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags=re.M)
        return compiled.search(self.output)

    def save_log(self, path: Path) -> None:
        """Keep the output for a post-mortem (the scenario's directory holds it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")


class Run:
    """A launched job (its own process group) whose output lines are timestamped as they arrive."""

    def __init__(
        self, command: list[str], env: dict[str, str], preexec_fn: Callable[[], None] | None = None
    ) -> None:
        self.started = time.time()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # one group: a timeout ends the launcher, ranks and workers
            preexec_fn=preexec_fn,
        )
        self.lines: list[tuple[float, str]] = []
        self._streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            with self._lock:
                self.lines.append((time.time(), line.rstrip("\n")))
                self._streams[name].append(line)

    def wait_for_line(self, pattern: str | re.Pattern, timeout: float) -> float | None:
        """Time of the first line matching ``pattern``; None if the job ended or time ran out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for when, line in self.lines:
                    if re.search(pattern, line):
                        return when
            if self.process.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def rank_pids(self) -> list[int]:
        """The training ranks of this job (not the launcher, not data-loader workers)."""
        group = os.getpgid(self.process.pid)
        members = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            # `python [-u] .../pretrain.py ...` (or the fault entry); launchers run a module or their
            # own script instead.
            script = next((arg for arg in argv[1:] if not arg.startswith("-")), "")
            if int(fields[2]) == group and Path(script).name in ENTRY_NAMES:
                members[int(entry.name)] = int(fields[1])  # pid -> parent pid
        # A data-loader worker is a fork of a rank, with the same command line.
        return sorted(pid for pid, parent in members.items() if parent not in members)

    def wait(self, timeout: float) -> RunResult:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise
        ended = time.time()
        for reader in self._readers:
            reader.join(timeout=10)
        return RunResult(
            self.process.returncode,
            "".join(self._streams["stdout"]),
            "".join(self._streams["stderr"]),
            list(self.lines),
            self.started,
            ended,
        )


def entry_for(extra_env: dict[str, str]) -> str:
    """FAULT_ENTRY when these extra variables ask for a fault (the production entry ignores them),
    else ENTRY: every run that needs no fault hook exercises what users launch."""
    return FAULT_ENTRY if any(name.startswith(FAULT_VARIABLE_PREFIX) for name in extra_env) else ENTRY


def pretrain_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.update(extra or {})
    return env


def pretrain_command(
    corpus: Path,
    output: Path,
    *args: str,
    ranks: int = 2,
    config: str = "cpu_tiny.json",
    launcher: str = "deepspeed",
    port: int = 29610,
    validation: bool = True,
    entry: str = ENTRY,
) -> list[str]:
    """The command line users type: ``corpus`` holds ``train/`` (and ``valid/``) shard sets;
    ``entry`` is the script the launcher runs (FAULT_ENTRY, or a probe, takes pretrain.py's flags)."""
    flags = [
        "--deepspeed_config",
        str(REPO / "ds_configs" / config),
        "--train-shards",
        str(corpus / "train"),
        "--output-dir",
        str(output),
        "--model",
        "tiny",
        "--num-workers",
        "1",
        "--log-every",
        "1",
    ]
    if validation:
        flags += ["--valid-shards", str(corpus / "valid"), "--max-valid-batches", "2"]
    flags += list(args)
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), entry, *flags]
    if launcher == "mpirun":
        return [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(ranks),
            "-x",
            f"MASTER_PORT={port}",
            "-x",
            "PYTHONPATH",
            "-x",
            "PATH",
            sys.executable,
            entry,
            *flags,
        ]
    return [sys.executable, entry, *flags]


def launch_pretrain(
    corpus: Path,
    output: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    **options,
) -> Run:
    """Start pre-training in the background (see :func:`pretrain_command` for ``options``).

    An ``env`` that sets an ``LXTRAIN_FAULT_*`` variable launches FAULT_ENTRY unless ``entry`` is
    given: the production entry ignores those variables.
    """
    extra = dict(env or {})
    if options.get("launcher", "deepspeed") == "python":
        extra.setdefault("MASTER_PORT", str(options.get("port", 29610)))
    options.setdefault("entry", entry_for(extra))
    return Run(pretrain_command(corpus, output, *args, **options), pretrain_env(extra), preexec_fn)


def run_pretrain(corpus: Path, output: Path, *args: str, timeout: float = 420, **options) -> RunResult:
    """Run pre-training to the end; ``subprocess.TimeoutExpired`` (job killed) after ``timeout`` s."""
    return launch_pretrain(corpus, output, *args, **options).wait(timeout)


def step_losses(output: Path) -> dict[int, dict[str, float]]:
    """Per-step losses from train_log.jsonl; a later record of a step (after a resume) wins."""
    path = output / "train_log.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


def max_relative_difference(left: dict[str, float], right: dict[str, float]) -> float:
    """Largest |a - b| / max(1, |a|) over the tasks; infinite when the task sets differ."""
    if left.keys() != right.keys():
        return float("inf")
    return max((abs(left[t] - right[t]) / max(1.0, abs(left[t])) for t in left), default=0.0)


def assert_same_losses(left: dict[str, float], right: dict[str, float], tolerance: float) -> None:
    assert left.keys() == right.keys()
    assert max_relative_difference(left, right) <= tolerance, (left, right)


def make_corpus(out: Path, images: int = 24, feature_dim: int = 32, shard_size: int = 8) -> Path:
    """A small synthetic corpus written straight to shards; returns the directory with train/ and valid/."""
    subprocess.run(
        [sys.executable, "-m", "lxtrain.synthetic.pretraining", "--out", str(out), "--images", str(images)]
        + ["--feature-dim", str(feature_dim), "--shard-size", str(shard_size), "--direct"],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    return out / "shards"


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps every file the job writes at ``max_bytes`` (a full disk, in effect).

    SIGXFSZ is ignored so that an over-long write fails with EFBIG instead of killing the process.
    """

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def incomplete_tags(checkpoints: Path) -> list[str]:
    """Checkpoint tags without their COMPLETE marker (half-written)."""
    if not checkpoints.is_dir():
        return []
    return sorted(
        p.name
        for p in checkpoints.iterdir()
        if checkpoint.TAG_PATTERN.match(p.name) and not (p / checkpoint.COMPLETE).exists()
    )


# --------------------------------------------------------------------------- damaging shards


def _rewrite_member(shard: Path, member: str, data: bytes) -> None:
    """Replace one member of a tar shard, keeping the others byte-identical."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers() if info.isfile()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, content in members:
            content = data if info.name == member else content
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def truncate_shard(shard: Path, keep_fraction: float = 0.6) -> str:
    """Cut the file short mid-member, as an interrupted copy would; returns what was done."""
    size = shard.stat().st_size
    keep = int(size * keep_fraction) // 512 * 512 + 100  # inside a member, not on a block boundary
    with open(shard, "r+b") as handle:
        handle.truncate(keep)
    return f"{shard.name} truncated from {size} to {keep} bytes"


def corrupt_member(shard: Path, key: str = "000000", member: str = "features.npy") -> str:
    """Overwrite the npy header of one member with garbage of the same length (bit rot)."""
    name = f"{key}.{member}"
    with tarfile.open(shard) as tar:
        data = tar.extractfile(name).read()
    _rewrite_member(shard, name, b"\x00garbage!" + data[9:])
    return f"{shard.name}: {name} header overwritten"


def wrong_feature_shape(shard: Path, key: str = "000000") -> str:
    """Replace one sample's features with an array of half the feature dimension (a mis-converted sample)."""
    name = f"{key}.features.npy"
    with tarfile.open(shard) as tar:
        features = np.load(io.BytesIO(tar.extractfile(name).read()), allow_pickle=False)
    buffer = io.BytesIO()
    np.save(buffer, features[:, : features.shape[1] // 2].copy(), allow_pickle=False)
    _rewrite_member(shard, name, buffer.getvalue())
    return f"{shard.name}: {name} now {features.shape[0]}x{features.shape[1] // 2}"


# --------------------------------------------------------------------------- the local Slurm cluster

SLURM_FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
SLURM_CLUSTER = REPO / ".ci" / "slurm_cluster.sh"


def slurm_env(conf: str | None = None) -> tuple[dict[str, str] | None, str]:
    """(environment for Slurm client commands, "") when two nodes answer, else (None, why not)."""
    conf = conf or os.environ.get("LXTRAIN_SLURM_CONF")
    if not conf:
        return (
            None,
            "no local Slurm cluster: `bash .ci/slurm_cluster.sh start; source /tmp/lxtrain-slurm/env.sh`",
        )
    env = dict(os.environ, SLURM_CONF=conf, LXTRAIN_PYTHON=sys.executable)
    wrappers = Path(conf).parent / "bin"  # client commands that reach the namespaced controller
    if wrappers.is_dir():
        env["PATH"] = f"{wrappers}{os.pathsep}{env['PATH']}"
    try:
        nodes = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"Slurm cluster at {conf} does not answer: {error}"
    usable = [line for line in nodes if re.fullmatch(r"\S+ (idle|mix|alloc)", line.strip())]
    if len(usable) < 2:
        return None, f"Slurm cluster at {conf} has fewer than two usable nodes: {nodes}"
    return env, ""


def submit(
    env: dict[str, str], run_dir: Path, sbatch_args: list[str], script_args: list[str], **lxtrain
) -> str:
    """Submits slurm/pretrain.sbatch; ``lxtrain`` gives LXTRAIN_* variables (output_dir is run_dir)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job_env = dict(env, LXTRAIN_OUTPUT_DIR=str(run_dir))
    job_env.update({f"LXTRAIN_{key.upper()}": str(value) for key, value in lxtrain.items()})
    result = subprocess.run(
        # --output keeps Slurm's own stream out of the repository (it holds one line otherwise).
        ["sbatch", "--parsable", f"--output={run_dir}/logs/%x-%j.out", *sbatch_args]
        + ["slurm/pretrain.sbatch", *script_args],
        cwd=REPO,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def job_fields(env: dict[str, str], job_id: str) -> dict[str, str]:
    text = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for_job_end(env: dict[str, str], job_id: str, timeout_s: float) -> dict[str, str]:
    """Polls until the job is finished (not merely requeued); cancels it and raises TimeoutError if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = job_fields(env, job_id)
        if fields["JobState"] in SLURM_FINISHED:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout_s}s")


def job_log(run_dir: Path, job_id: str) -> str:
    return "".join(path.read_text() for path in sorted((run_dir / "logs").glob(f"*-{job_id}.out")))


def wait_for_nodes(env: dict[str, str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if slurm_env(env["SLURM_CONF"])[0] is not None:
            return True
        time.sleep(1)
    return False


# --------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Row:
    """One line of the table; every field measured by the scenario."""

    fault: str
    happened: str
    detect_s: float | None
    steps_lost: int | None
    equal: str
    ok: bool
    problems: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        detect = "-" if self.detect_s is None else f"{self.detect_s:.1f} s"
        lost = "-" if self.steps_lost is None else str(self.steps_lost)
        verdict = "" if self.ok else " **FAILED: " + "; ".join(self.problems) + "**"
        return f"| {self.fault} | {self.happened}{verdict} | {detect} | {lost} | {self.equal} |"


@dataclasses.dataclass
class Suite:
    """What every scenario shares: scratch space, the corpus, the run length and the reference run."""

    work: Path
    corpus: Path
    max_steps: int
    epochs: int = 2
    save_every: int = 2
    detect_bound_s: float = 180.0
    port: int = 29750
    reference: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    steps_per_epoch: int = 0

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def args(self, *extra: str) -> list[str]:
        common = ["--epochs", str(self.epochs), "--max-steps", str(self.max_steps)]
        return [*common, "--save-every", str(self.save_every), "--no-export", *extra]

    def launch(self, output: Path, *extra: str, corpus: Path | None = None, **options) -> Run:
        return launch_pretrain(
            corpus or self.corpus,
            output,
            *self.args(*extra),
            port=self.next_port(),
            validation=False,
            **options,
        )

    def run(self, output: Path, *extra: str, timeout: float = 420, **options) -> RunResult:
        return self.launch(output, *extra, **options).wait(timeout)


def build_reference(suite: Suite) -> RunResult:
    """The uninterrupted run every resumed run is compared with (it keeps all its checkpoints)."""
    result = suite.run(suite.work / "reference", "--keep-last", "1000")
    if result.returncode != 0:
        raise RuntimeError(f"reference run failed (exit {result.returncode}):\n{result.output[-3000:]}")
    suite.reference = step_losses(suite.work / "reference")
    found = result.search(r"(\d+) steps/epoch")
    suite.steps_per_epoch = int(found.group(1)) if found else 0
    return result


def seed_from_reference(suite: Suite, output: Path, step: int) -> None:
    """Give ``output`` the reference run's checkpoint and log up to ``step``: the state a run stopped
    there would have left (the trajectory is deterministic), without spending a run on it."""
    tag = checkpoint.tag_for(step)
    shutil.copytree(suite.work / "reference" / "checkpoints" / tag, output / "checkpoints" / tag)
    (output / "checkpoints" / checkpoint.LATEST).write_text(tag + "\n")
    lines = (suite.work / "reference" / "train_log.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    (output / "train_log.jsonl").write_text("".join(line + "\n" for line in kept))


def _snippet(result_text: str, pattern: str, width: int = 110) -> str | None:
    found = re.search(pattern, result_text, flags=re.M)
    if not found:
        return None
    # Named groups pick the telling parts of a long line (the launcher prints a rank's whole argv).
    parts = [value for value in found.groupdict().values() if value] or [found.group(0)]
    text = " ... ".join(" ".join(part.split()) for part in parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def compare_resumed(
    suite: Suite, output: Path, resumed: RunResult, reference: dict[int, dict[str, float]] | None = None
) -> tuple[int | None, str, bool]:
    """(step resumed from, "yes (steps a-b, max rel. diff x)" or why not, equal?) after a resume run."""
    reference = reference if reference is not None else suite.reference
    found = resumed.search(RESUMED_LINE)
    start = int(found.group(2)) if found else 0
    losses = step_losses(output)
    steps = list(range(start + 1, suite.max_steps + 1))
    missing = [s for s in steps if s not in losses or s not in reference]
    if resumed.returncode != 0 or missing:
        return start, f"no: resume exit {resumed.returncode}, steps missing {missing[:5]}", False
    worst = max(max_relative_difference(losses[s], reference[s]) for s in steps)
    equal = worst <= LOSS_TOLERANCE
    return (
        start,
        f"{'yes' if equal else 'no'} (steps {steps[0]}-{steps[-1]}, max rel. diff {worst:.1e})",
        equal,
    )


def stop_and_resume(
    suite: Suite,
    name: str,
    fault: str,
    *,
    fault_extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    act: Callable[[Run], float | None] | None = None,
    fault_time: Callable[[RunResult], float | None],
    expect: str,
    expect_exit: Callable[[int], bool] = lambda code: code != 0,
    repair: Callable[[Path], str] | None = None,
    corpus: Path | None = None,
    reference: dict[int, dict[str, float]] | None = None,
    resume_ranks: int = 2,
) -> Row:
    """The common shape: faulty run -> (repair) -> ``--resume auto`` -> compare with the reference.

    ``act`` runs while the faulty job runs (sends a signal, damages a shard...) and may return the
    fault's time; otherwise ``fault_time`` finds it in the output. ``expect`` is the regex of the
    message that must name the cause. The faulty run has two ranks; the resume ``resume_ranks``.
    """
    output = suite.work / name
    problems: list[str] = []
    run = suite.launch(output, *(fault_extra or []), env=env, preexec_fn=preexec_fn, corpus=corpus)
    acted_at = act(run) if act is not None else None
    faulty = run.wait(timeout=420)
    faulty.save_log(output / "fault_run.log")
    when = acted_at if acted_at is not None else fault_time(faulty)
    detect = None if when is None else faulty.ended - when
    message = _snippet(faulty.output, expect)
    if message is None:
        problems.append(f"no message matching {expect!r}")
    if not expect_exit(faulty.returncode):
        problems.append(f"unexpected exit {faulty.returncode}")
    if detect is None or detect > suite.detect_bound_s:
        problems.append(f"detection time {detect}")
    last_done = max(step_losses(output), default=0)
    half_written = incomplete_tags(output / "checkpoints")
    expected_tag = checkpoint.find_resume_tag(output / "checkpoints")
    repaired = repair(output) if repair is not None else ""
    resumed = suite.run(output, "--resume", "auto", corpus=corpus, ranks=resume_ranks)
    resumed.save_log(output / "resume_run.log")
    start, equal_text, equal = compare_resumed(suite, output, resumed, reference)
    if not equal:
        problems.append("resumed losses differ" + ("" if resumed.returncode == 0 else resumed.output[-1500:]))
    expected_start = int(expected_tag[4:]) if expected_tag else 0
    if start != expected_start:
        problems.append(f"resumed from step {start}, newest complete checkpoint was {expected_start}")
    if incomplete_tags(output / "checkpoints"):
        problems.append(f"half-written checkpoints left: {incomplete_tags(output / 'checkpoints')}")
    happened = f"exit {faulty.returncode}: “{message}”"
    if half_written:
        happened += f"; half-written {', '.join(half_written)} ignored"
    if repaired:
        happened += f"; {repaired}"
    happened += f"; resumed from step {start}"
    return Row(fault, happened, detect, max(0, last_done - start), equal_text, not problems, problems)


def _fault_line_time(result: RunResult) -> float | None:
    found = FAULT_LINE.search(result.output)
    return float(found.group(1)) if found else None


def kill_one_rank(suite: Suite) -> Row:
    step = suite.max_steps // 2 + 1
    return stop_and_resume(
        suite,
        "kill_rank",
        "kill -9 of one rank (rank 1) mid-run",
        env={FAULT_SIGKILL_AT_STEP: str(step), FAULT_RANK: "1"},
        fault_time=_fault_line_time,
        expect=r"(?P<rank>--local_rank=1)'[^\n]*(?P<code>exits with return code = -9)",
    )


UNIVERSAL_LOAD = r"written on (\d+) DP rank\(s\) with ZeRO-\S+, loading on (\d+) with ZeRO-\d+ through DeepSpeed's universal"


def resume_on_another_world_size(suite: Suite, ranks: int = 1) -> Row:
    """kill -9 of both ranks after a step, resumed on ``ranks`` ranks: the same global batch (the
    DeepSpeed config fixes it; accumulation makes up the difference) gives the same losses.

    The model and optimiser state crosses through DeepSpeed's universal checkpoint, the data
    position through the world-independent stream; see docs/elastic.md.
    """
    step = suite.max_steps // 2 + 1
    row = stop_and_resume(
        suite,
        "other_world_size",
        f"kill -9 of the whole job (2 ranks) mid-run, resumed on {ranks} rank{'s' if ranks > 1 else ''}",
        env={FAULT_SIGKILL_AT_STEP: str(step)},
        fault_time=_fault_line_time,
        expect=r"SIGKILL rank \d after step \d+",
        resume_ranks=ranks,
    )
    log = suite.work / "other_world_size" / "resume_run.log"
    found = re.search(UNIVERSAL_LOAD, log.read_text()) if log.exists() else None
    if found is None or (int(found.group(1)), int(found.group(2))) != (2, ranks):
        row.ok, row.problems = False, [*row.problems, f"no universal load from 2 to {ranks} rank(s) in {log}"]
    else:
        row.happened += f" on {ranks} rank{'s' if ranks > 1 else ''} through DeepSpeed's universal checkpoint"
    return row


def kill_job_in_save(suite: Suite) -> Row:
    step = 2 * suite.save_every
    return stop_and_resume(
        suite,
        "kill_in_save",
        "kill -9 of the whole job while writing a checkpoint",
        env={FAULT_SIGKILL_IN_SAVE: str(step)},
        fault_time=_fault_line_time,
        expect=r"SIGKILL rank \d while saving step \d+",
    )


def _send_signal_after(step: int, signum: int) -> Callable[[Run], float | None]:
    def act(run: Run) -> float | None:
        if run.wait_for_line(rf"^step {step}/", timeout=300) is None:
            return None
        sent = time.time()
        for pid in run.rank_pids():
            os.kill(pid, signum)
        return sent

    return act


def sigterm_requeue(suite: Suite) -> Row:
    def requeue(output: Path) -> str:
        marker = output / "REQUEUE"
        return f"REQUEUE marker ({marker.read_text().strip()}) -> resubmitted" if marker.exists() else ""

    row = stop_and_resume(
        suite,
        "sigterm",
        "SIGTERM (pre-emption / Slurm pre-timeout signal) to every rank",
        act=_send_signal_after(3, signal.SIGTERM),
        fault_time=lambda result: None,
        expect=r"checkpoint saved at step \d+ \(signal[^\n]*",
        expect_exit=lambda code: code == 0,
        repair=requeue,
    )
    if "REQUEUE marker" not in row.happened:
        row.ok, row.problems = False, [*row.problems, "no REQUEUE marker"]
    return row


def disk_full_in_save(suite: Suite) -> Row:
    """The run resumes from a complete checkpoint onto a 'full disk' (a file-size limit far below a
    checkpoint's size), so its next save fails; the limit lifted, ``--resume auto`` continues."""
    output = suite.work / "disk_full"
    seed_from_reference(suite, output, suite.save_every)
    return stop_and_resume(
        suite,
        "disk_full",
        "disk full while saving (1 MiB file-size limit)",
        preexec_fn=limit_file_size(1 << 20),
        fault_time=lambda result: result.time_of(PROGRESS_LINE, last=True),
        expect=r"saving the checkpoint failed[^\n]*",
    )


def _damage_during_epoch_one(shard: Path, damage: Callable[[Path], str]) -> Callable[[Run], float | None]:
    """Damage ``shard`` once epoch 1 is running (its data already read); epoch 2 then reads it."""

    def act(run: Run) -> float | None:
        if run.wait_for_line(r"^step 1/", timeout=300) is not None:
            damage(shard)
        return None

    return act


def damaged_data(suite: Suite, name: str, fault: str, damage: Callable[[Path], str]) -> Row:
    """A shard damaged on disk mid-run; repaired by restoring it (what re-running the conversion does)."""
    corpus = suite.work / name / "shards"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.copytree(suite.corpus / "train", corpus / "train")
    shard = sorted((corpus / "train").glob("*.tar"))[1]

    def restore(output: Path) -> str:
        shutil.copy2(suite.corpus / "train" / shard.name, shard)
        return f"{shard.name} restored"

    return stop_and_resume(
        suite,
        f"{name}/run",
        fault,
        act=_damage_during_epoch_one(shard, damage),
        fault_time=lambda result: result.time_of(r"checkpoint saved at step \d+ \(epoch end\)"),
        expect=rf"error: {re.escape(shard.name)}[^\n]*",
        repair=restore,
        corpus=corpus,
    )


def nan_loss(suite: Suite) -> Row:
    """NaN in two micro-batches in a row with --max-bad-steps 2: skipped, then a stop with a checkpoint.

    The comparison run skips the same micro-batches without stopping (--max-bad-steps 5).
    """
    bad = f"{suite.max_steps // 2},{suite.max_steps // 2 + 1}"
    skipping = suite.run(suite.work / "nan_reference", "--max-bad-steps", "5", env={FAULT_NAN_AT_BATCH: bad})
    if skipping.returncode != 0:
        return Row(
            "NaN in the loss", f"comparison run failed: {skipping.output[-300:]}", None, None, "-", False
        )
    return stop_and_resume(
        suite,
        "nan",
        "NaN in the loss (2 micro-batches in a row, --max-bad-steps 2)",
        fault_extra=["--max-bad-steps", "2"],
        env={FAULT_NAN_AT_BATCH: bad},
        fault_time=_fault_line_time,
        expect=r"non-finite losses in a row[^\n]*",
        expect_exit=lambda code: code == 3,
        reference=step_losses(suite.work / "nan_reference"),
    )


CUT_DETECTED = r"lost contact with another rank[^\n]*|CANCELLED AT \S+ DUE TO NODE FAILURE"


def network_cut(suite: Suite, cut_after_step: int = 5, collective_timeout_s: int = 10) -> Row:
    """The veth link between the two Slurm nodes goes down mid-run; healed, the job is resubmitted."""
    fault = "network cut between the two Slurm nodes"
    env, why = slurm_env()
    if env is None:
        return Row(fault, f"not run: {why}", None, None, "-", False, [why])
    output = suite.work / "network_cut"
    # The same data layout and logging as the local reference run (pretrain_command's flags).
    job_args = suite.args(
        "--num-workers", "1", "--log-every", "1", "--collective-timeout-s", str(collective_timeout_s)
    )
    variables = dict(ds_config="ds_configs/cpu_tiny.json", train_shards=suite.corpus / "train", model="tiny")
    job = submit(env, output, ["--nodes=2", "--ntasks-per-node=1", "--no-requeue"], job_args, **variables)
    problems: list[str] = []
    deadline = time.monotonic() + 300
    while max(step_losses(output), default=0) < cut_after_step and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["bash", str(SLURM_CLUSTER), "cut"], check=True, capture_output=True, timeout=30)
    cut_at = time.time()
    stopped_at = None
    try:  # the ranks' own timeout, or Slurm declaring the unreachable node dead, ends the job
        while stopped_at is None and time.time() - cut_at < 300:
            if (
                re.search(CUT_DETECTED, job_log(output, job))
                or job_fields(env, job)["JobState"] in SLURM_FINISHED
            ):
                stopped_at = time.time()
            time.sleep(0.2)
    finally:
        subprocess.run(["bash", str(SLURM_CLUSTER), "heal"], check=True, capture_output=True, timeout=30)
    try:
        fields = wait_for_job_end(env, job, 300)
    except TimeoutError as error:
        fields = {"JobState": str(error)}
    ended_at = time.time()
    log = job_log(output, job)
    message = _snippet(log, CUT_DETECTED)
    if message is None or stopped_at is None:
        problems.append("no rank reported the lost contact")
    last_done = max(step_losses(output), default=0)
    if not wait_for_nodes(env, 120):
        problems.append("nodes did not come back after heal")
    resumed_job = submit(env, output, ["--nodes=2", "--ntasks-per-node=1"], job_args, **variables)
    resumed_fields = wait_for_job_end(env, resumed_job, 300)
    resumed_log = job_log(output, resumed_job)
    resumed = RunResult(0 if resumed_fields["JobState"] == "COMPLETED" else 1, resumed_log, "", [], 0, 0)
    start, equal_text, equal = compare_resumed(suite, output, resumed)
    if not equal:
        problems.append(f"resumed job {resumed_fields['JobState']}: {resumed_log[-1500:]}")
    reporting = len(re.findall(r"\[rank \d+\] error: rank \d+: lost contact", log))
    happened = (
        f"job {fields['JobState']} {ended_at - cut_at:.0f} s after the cut, {reporting} of 2 ranks: “{message}”; "
        f"link healed, resubmitted, resumed from step {start}"
    )
    detect = None if stopped_at is None else stopped_at - cut_at
    return Row(fault, happened, detect, max(0, last_done - start), equal_text, not problems, problems)


def scenarios(suite: Suite) -> dict[str, Callable[[], Row]]:
    """Every scenario of the suite by name, in the order of the table."""
    return {
        "kill_rank": lambda: kill_one_rank(suite),
        "kill_in_save": lambda: kill_job_in_save(suite),
        "other_world_size": lambda: resume_on_another_world_size(suite),
        "sigterm": lambda: sigterm_requeue(suite),
        "network_cut": lambda: network_cut(suite),
        "truncated": lambda: damaged_data(
            suite, "truncated", "truncated shard (file cut mid-member)", truncate_shard
        ),
        "corrupt_member": lambda: damaged_data(
            suite, "corrupt_member", "shard with a corrupt member (bad npy header)", corrupt_member
        ),
        "wrong_shape": lambda: damaged_data(
            suite, "wrong_shape", "sample with the wrong feature shape", wrong_feature_shape
        ),
        "disk_full": lambda: disk_full_in_save(suite),
        "nan": lambda: nan_loss(suite),
    }


TABLE_HEADER = (
    "| fault | what happened | time to detect | steps lost | resumed equal? |\n|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lxtrain.testing.faults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="scratch directory (runs, corpus, table.md)")
    parser.add_argument(
        "--max-steps", type=int, default=12, help="steps of every run (epoch 2 starts at ~10)"
    )
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(work=args.out, corpus=make_corpus(args.out / "corpus"), max_steps=args.max_steps)
    available = scenarios(suite)
    chosen = args.only.split(",") if args.only else list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        parser.error(f"--only: unknown scenario(s) {unknown}; choose from {list(available)}")
    started = time.monotonic()
    build_reference(suite)
    print(f"reference run: {suite.steps_per_epoch} steps/epoch, {suite.max_steps} steps", flush=True)
    rows = []
    for name in chosen:
        try:
            row = available[name]()
        except Exception as error:  # a broken scenario is a failed row, not a lost table
            row = Row(name, f"crashed: {error!r}", None, None, "-", False, [repr(error)])
        print(row.markdown(), flush=True)
        rows.append(row)
    table = "\n".join([TABLE_HEADER, *(row.markdown() for row in rows)])
    (args.out / "table.md").write_text(table + "\n")
    print(
        f"\n{table}\n\n{sum(r.ok for r in rows)}/{len(rows)} scenarios passed in {time.monotonic() - started:.0f} s"
    )
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
