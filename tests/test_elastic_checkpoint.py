"""Resume on another DP world size: a checkpoint written on 2 gloo ranks loads on 3 and on 1.

One launch per world size runs every ZeRO stage x precision in turn on a two-layer module (the
checkpoint logic does not depend on LXMERT): 2 ranks train two steps and save; 3 ranks load (rank 0
converts to DeepSpeed's universal form while the others wait); 1 rank loads again (reusing the
conversion). Each load compares the full fp32 master weights and Adam moments, gathered with
DeepSpeed's ``safe_get_full_*`` helpers, with those gathered at save time, then trains one more
step. This file is also the worker the test launches (``python tests/test_elastic_checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEP = 2
# (ZeRO stage, precision). bf16 runs through DeepSpeed's CPU path; fp16 needs a GPU (loss scaling
# kernels), so it is not covered here.
LAYOUTS = [(1, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")]
TOLERANCE = 1e-6


def layout_name(stage: int, precision: str) -> str:
    return f"zero{stage}-{precision}"


# ------------------------------------------------------------------------------------------
# Worker (runs in each launched rank).


class TwoLayers(torch.nn.Module):
    """Small but not trivial: a weight whose size no world size here divides, and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(7, 13)
        self.second = torch.nn.Linear(13, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(inputs.to(self.first.weight.dtype)))
        return self.second(hidden).float().pow(2).mean()


def deepspeed_config(stage: int, precision: str, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4 * world,
        # torch's Adam: no JIT build; DeepSpeed's universal form keeps its exp_avg / exp_avg_sq.
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 0.01}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }


def full_state(engine) -> dict[str, torch.Tensor]:
    """Master weights and Adam moments of every parameter, unpartitioned (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, parameter in engine.module.named_parameters():
        state[f"{name}/fp32"] = safe_get_full_fp32_param(parameter).detach().float().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = safe_get_full_optimizer_state(parameter, key).detach().float().clone()
    return state


def train_step(engine, rank: int, step: int) -> float:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    loss = engine(torch.randn(4, 7, generator=generator))
    engine.backward(loss)
    engine.step()
    return float(loss)


def worker(phase: str, root: Path, layouts: list[tuple]) -> None:
    """Save or load every layout in turn; a layout ``(stage, precision, source)`` loads the
    checkpoint written by the layout named ``source`` (a ZeRO stage change)."""
    import deepspeed
    import torch.distributed as dist

    from lxtrain import checkpoint
    from lxtrain.engine import initialize

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict[str, dict] = {}
    for stage, precision, *source in layouts:
        name = layout_name(stage, precision)
        directory = root / (source[0] if source else name)
        if source:
            name = f"{name}<-{source[0]}"
        torch.manual_seed(0 if phase == "save" else 1)  # a loaded run starts from other weights
        engine = initialize(TwoLayers(), deepspeed_config(stage, precision, world))
        entry: dict = {}
        if phase == "save":
            for step in range(1, STEP + 1):
                train_step(engine, rank, step)
            checkpoint.save(engine, directory, STEP, {"step": STEP, "config": {"seed": 5}}, keep_last=2)
            expected = full_state(engine)
            if rank == 0:
                torch.save({"state": expected, "lr": engine.get_lr()[0]}, directory / "expected.pt")
        else:
            started = time.monotonic()
            try:
                state = checkpoint.load(engine, directory, checkpoint.tag_for(STEP))
            except checkpoint.UniversalConversionError as error:
                entry["conversion_error"] = str(error)
                report[name] = entry
                continue
            entry["load_s"] = round(time.monotonic() - started, 2)
            entry["step"] = state["step"]
            entry["global_steps"] = int(engine.global_steps)
            entry["lr"] = engine.get_lr()[0]
            loaded = full_state(engine)
            saved = torch.load(directory / "expected.pt", weights_only=True)
            expected = saved["state"]
            entry["saved_lr"] = saved["lr"]
            entry["max_difference"] = {
                key: float((loaded[key] - expected[key]).abs().max()) for key in sorted(expected)
            }
            entry["module_matches_master"] = all(
                torch.equal(parameter.detach().float(), loaded[f"{key}/fp32"].to(parameter.dtype).float())
                for key, parameter in engine.module.named_parameters()
                if stage < 3  # ZeRO-3 modules hold empty partitions outside a gather
            )
            entry["next_loss"] = train_step(engine, rank, STEP + 1)
        report[name] = entry
        del engine
    (root / f"report-{phase}-{world}-rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# Test (launches the workers).


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(phase: str, world: int, root: Path, layouts: list[tuple], timeout: float = 240) -> list[dict]:
    """Run ``world`` ranks of the worker; return each rank's report."""
    port = _free_port()
    spec = ",".join(":".join(map(str, layout)) for layout in layouts)
    failed = []
    with contextlib.ExitStack() as logs:
        processes = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO),
            )
            log = logs.enter_context(open(root / f"log-{phase}-{world}-rank{rank}.txt", "w"))
            command = [sys.executable, __file__, phase, str(root), spec]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for rank, process in enumerate(processes):
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                code = "timeout"
            if code != 0:
                failed.append((rank, code))
    if failed:
        tails = [
            f"--- rank {rank} ({code}):\n"
            + (root / f"log-{phase}-{world}-rank{rank}.txt").read_text()[-3000:]
            for rank, code in failed
        ]
        pytest.fail(f"{phase} on {world} rank(s) failed: {failed}\n" + "\n".join(tails))
    return [
        json.loads((root / f"report-{phase}-{world}-rank{rank}.json").read_text()) for rank in range(world)
    ]


@pytest.mark.multiproc
def test_model_and_optimizer_state_load_on_another_world_size(tmp_path):
    launch("save", 2, tmp_path, LAYOUTS)
    tag = f"step{STEP:08d}"
    from lxtrain import checkpoint

    for stage, precision in LAYOUTS:  # the one ZeRO consolidation (export, fine-tuning --init)
        directory = tmp_path / layout_name(stage, precision)
        expected = torch.load(directory / "expected.pt", weights_only=True)["state"]
        consolidated = checkpoint.fp32_state_dict(directory, tag, prefix="")
        assert sorted(consolidated) == ["first.bias", "first.weight", "second.bias", "second.weight"]
        for key, tensor in consolidated.items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[f"{key}/fp32"]), (
                stage,
                key,
            )
        assert sorted(checkpoint.fp32_state_dict(directory, tag, prefix="second.")) == ["bias", "weight"]
    # A checkpoint that cannot be converted: every rank must hear of it, none may hang.
    broken = tmp_path / layout_name(2, "broken")
    shutil.copytree(tmp_path / layout_name(2, "fp32"), broken)
    for partition in (broken / tag).glob("*zero_pp_rank_1_*optim_states.pt"):
        partition.unlink()
    grown = launch("load", 3, tmp_path, LAYOUTS + [(2, "broken")])
    for stage, precision in LAYOUTS:
        assert (tmp_path / layout_name(stage, precision) / tag / "universal").is_dir()
    # ZeRO-1 <-> ZeRO-2 also go through the universal form (3 <-> 1/2 is refused: test_checkpoint_files).
    changed = [(2, "bf16", layout_name(1, "bf16")), (1, "fp32", layout_name(2, "fp32"))]
    shrunk = launch("load", 1, tmp_path, LAYOUTS + changed)

    for world, reports in ((3, grown), (1, shrunk)):
        names = [layout_name(*layout) for layout in LAYOUTS]
        if world == 1:
            names += [f"{layout_name(stage, precision)}<-{source}" for stage, precision, source in changed]
        for name in names:
            for rank, report in enumerate(reports):
                entry = report[name]
                where = f"{name} on {world} rank(s), rank {rank}"
                assert entry["step"] == STEP and entry["global_steps"] == STEP, where
                assert entry["lr"] == entry["saved_lr"], where  # the LR schedule's position
                worst = max(entry["max_difference"].values())
                assert worst <= TOLERANCE, (where, entry["max_difference"])
                assert entry["module_matches_master"], where
                assert entry["next_loss"] == entry["next_loss"], where  # trains on: finite loss
    for rank, report in enumerate(grown):
        message = report["zero2-broken"]["conversion_error"]
        assert str(broken / tag) in message and "resume on 2 rank(s)" in message, (rank, message)
    assert not (broken / tag / "universal").exists()


if __name__ == "__main__":
    _phase, _root, _spec = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    _layouts = []
    for item in _spec.split(","):
        _stage, *_rest = item.split(":")
        _layouts.append((int(_stage), *_rest))
    worker(_phase, _root, _layouts)
