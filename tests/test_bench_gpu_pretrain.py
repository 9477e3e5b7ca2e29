"""bench/gpu_pretrain.py's report: totals over time after warm-up, ratios to HF and the goals' verdicts,
from a fabricated results directory whose right answers are worked out by hand below."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_pretrain_bench", REPO / "bench" / "gpu_pretrain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

FLOPS, PEAK = 1e9, 10.0  # per sample; TFLOP/s: MFU = samples/s x 1e9 / 1e13
# Logged windows of 4 steps at batch 256: (step, samples/s, data-wait share). Warm-up is 8 steps,
# so the windows ending at 12 and 16 count: 1024/200 = 5.12 s and 1024/1000 = 1.024 s, waits
# 0.5 x 5.12 + 0.1 x 1.024 = 2.6624 s; share 2.6624 / 6.144 = 0.43333, samples/s 2048 / 6.144 = 333.33
# (the windows' median would say 600 samples/s and a 30% wait).
WINDOWS = [(4, 50.0, 0.9), (8, 100.0, 0.5), (12, 200.0, 0.5), (16, 1000.0, 0.1)]


def _variant(timed_s: float, status: str = "ok") -> dict:
    return {
        "batch": 256,
        "status": status,
        "warmup_steps": 5,
        "warmup_s": 1.0,
        "timed_steps": 20,
        "timed_s": timed_s,
    }


def _write_tensorboard(run_dir: Path, windows: list[tuple[int, float, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step, samples_per_s, share in windows:
        writer.add_scalar("train/samples_per_s", samples_per_s, step)
        writer.add_scalar("train/data_wait_share", share, step)
    writer.close()


def _fabricate(out: Path, end_mark: float, windows: list[tuple[int, float, float]]) -> None:
    (out / "environment.json").write_text(json.dumps({"gpu": "fake", "size": "base", "batch": 256}))
    # Loader: 4 warm-up batches by 4.0 s, then 3 more by 8.0 s: 3 x 256 / 4.0 = 192 samples/s (the
    # median gap after warm-up, 0.5 s, would say 512).
    loader = {"batch": 256, "workers": 8, "pin_memory": True, "warm_batches": 4}
    loader["arrivals_s"] = [2.0, 2.5, 3.0, 4.0, 4.5, 5.0, 8.0]
    (out / "loader.json").write_text(json.dumps(loader))
    # Model: 20 steps of 256 each: HF in 2.0 s = 2560/s; eager 4.0 s = 1280/s; default 1.0 s = 5120/s.
    model = {"flops_per_sample": FLOPS, "peak_tflops": PEAK, "size": "base", "batch": 256}
    model["variants"] = {
        "hf": _variant(2.0),
        "eager": _variant(4.0),
        "default": _variant(1.0),
        "cudagraphs": {"batch": 256, "status": "failed: BackendCompilerFailed: boom"},
    }
    (out / "model.json").write_text(json.dumps(model))
    # Engine: plain 4.0 s = 1280/s, ZeRO-2 5.0 s = 1024/s: 0.8x plain, 0.4x HF.
    engine = {
        "flops_per_sample": FLOPS,
        "peak_tflops": PEAK,
        "variants": {"plain": _variant(4.0), "zero2": _variant(5.0)},
    }
    (out / "engine.json").write_text(json.dumps(engine))
    # Full run: warm-up 8 steps, marks at steps 8 and 16, 256 samples per step.
    run = out / "runs" / "auto"
    run.mkdir(parents=True)
    record = {
        "exit_code": 0,
        "compile_requested": "auto",
        "compile_resolved": "default",
        "compiled": True,
        "warm_steps": 8,
        "max_steps": 16,
        "steps_done": 16,
        "samples_per_step": 256,
        "flops_per_sample": FLOPS,
        "peak_tflops": PEAK,
        "marks_s": {"8": 10.0, "16": end_mark},
        "step_end_s": [90.0] + [90.0 + i for i in range(1, 16)],
    }
    (run / "record.json").write_text(json.dumps(record))
    _write_tensorboard(run, windows)
    failed = out / "runs" / "off"
    failed.mkdir(parents=True)
    (failed / "record.json").write_text(json.dumps({"exit_code": "died before finishing", "warm_steps": 8}))
    (out / "stages.tsv").write_text("setup\tok\t40\t0\nfull_auto\ttimed out\t180\t180\n")


def test_collect_computes_totals_over_time_ratios_and_unmet_goals(tmp_path: Path) -> None:
    _fabricate(tmp_path, end_mark=14.0, windows=WINDOWS)
    results = bench.collect(tmp_path)
    stages = results["stages"]

    assert stages["loader"]["samples_per_s"] == pytest.approx(192.0)
    assert stages["loader"]["warm_samples_per_s"] == pytest.approx(256.0)  # 4 x 256 / 4.0 s

    model = stages["model"]["variants"]
    assert model["hf"]["samples_per_s"] == pytest.approx(2560.0)
    assert model["hf"]["mfu"] == pytest.approx(0.256)
    assert model["eager"]["vs_hf"] == pytest.approx(0.5)
    assert model["default"]["vs_hf"] == pytest.approx(2.0)
    assert model["default"]["step_ms"] == pytest.approx(50.0)
    assert model["cudagraphs"]["samples_per_s"] is None
    assert model["cudagraphs"]["status"].startswith("failed")

    engine = stages["engine"]["variants"]
    assert engine["zero2"]["vs_plain"] == pytest.approx(0.8)
    assert engine["zero2"]["vs_hf"] == pytest.approx(0.4)

    # 8 steps x 256 over 14.0 - 10.0 s = 512 samples/s: 0.2x HF, MFU 512e9 / 1e13.
    full = stages["pretrain"]["auto"]
    assert full["samples_per_s"] == pytest.approx(512.0)
    assert full["vs_hf"] == pytest.approx(0.2)
    assert full["mfu"] == pytest.approx(0.0512)
    assert full["data_wait_share"] == pytest.approx(2.6624 / 6.144)
    assert full["windows_after_warmup"]["samples_per_s"] == pytest.approx(2048 / 6.144)
    assert full["windows_after_warmup"]["windows"] == 2
    assert full["first_step_s"] == pytest.approx(90.0)
    assert stages["pretrain"]["off"]["samples_per_s"] is None
    assert "died before finishing" in stages["pretrain"]["off"]["status"]

    goals = results["goals"]
    assert goals["full_step_over_hf"] == {
        "value": pytest.approx(0.2),
        "target": 2.0,
        "met": False,
        "goal_setting": True,
    }
    assert goals["mfu"]["met"] is False
    assert goals["data_wait_share"]["met"] is False
    assert results["stage_times"][1] == {
        "stage": "full_auto",
        "status": "timed out",
        "seconds": 180,
        "limit_s": 180,
    }

    text = (tmp_path / "results.md").read_text()
    assert "**NOT MET**: pretrain.py --compile auto 512.0 samples/s vs HF 2560.0 samples/s = 0.20x" in text
    assert "MFU >= 25%: **NOT MET**: 5.1%" in text
    assert "Data wait < 2%: **NOT MET**: 43.3%" in text
    assert json.loads((tmp_path / "results.json").read_text())["ratios_to_hf"][
        "pretrain/auto"
    ] == pytest.approx(0.2)


def test_goals_met_when_the_numbers_say_so(tmp_path: Path) -> None:
    # 8 x 256 / 0.25 s = 8192 samples/s = 3.2x HF, MFU 0.8192; waits of 1% in every window.
    _fabricate(tmp_path, end_mark=10.25, windows=[(step, rate, 0.01) for step, rate, _ in WINDOWS])
    goals = bench.collect(tmp_path)["goals"]
    assert goals["full_step_over_hf"]["value"] == pytest.approx(3.2)
    assert [goals[name]["met"] for name in ("full_step_over_hf", "mfu", "data_wait_share")] == [
        True,
        True,
        True,
    ]
    assert goals["data_wait_share"]["value"] == pytest.approx(0.01)


def test_windows_that_start_inside_warm_up_are_left_out() -> None:
    # Warm-up of 6 steps with windows of 4: the window (4, 8] began inside it and does not count.
    totals = bench.window_totals(WINDOWS, warm_steps=6, samples_per_step=256)
    assert totals["windows"] == 2
    assert totals["samples"] == 2048
    assert totals["seconds"] == pytest.approx(6.144)
    no_wait = bench.window_totals([(4, 100.0, None), (8, 100.0, None)], warm_steps=0, samples_per_step=10)
    assert no_wait["samples_per_s"] == pytest.approx(100.0)
    assert no_wait["data_wait_share"] is None


def test_loader_without_batches_after_warm_up_has_no_rate() -> None:
    figures = bench.loader_figures({"batch": 8, "warm_batches": 4, "arrivals_s": [1.0, 2.0, 3.0, 4.0]})
    assert figures["samples_per_s"] is None
    assert figures["warm_samples_per_s"] == pytest.approx(8.0)  # 4 x 8 / 4.0 s
    assert "none after the 4 warm-up batches" in figures["status"]


def test_time_steps_runs_warm_up_then_timed_steps() -> None:
    import time

    import torch

    calls: list[float] = []

    def step() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.01)

    timing = bench.time_steps(step, warmup=2, steps=3, device=torch.device("cpu"))
    assert len(calls) == 5
    assert timing["warmup_steps"] == 2 and timing["timed_steps"] == 3
    assert timing["timed_s"] >= 0.03
    assert timing["warmup_s"] >= 0.02


def test_engine_stage_from_engine_overhead_report(tmp_path: Path) -> None:
    # bench/engine_overhead.py's JSON replaces engine.json: 20 steps of 256 in 2.0 s (plain) and
    # 2.5 s (ZeRO-2): 2560 and 2048 samples/s, 0.8x plain; HF (model stage) is 2560/s.
    _fabricate(tmp_path, end_mark=14.0, windows=WINDOWS)

    def row(wall: float, syncs: int) -> dict:
        return {
            "optimizer": "X",
            "total_wall_s": wall,
            "aten_ops": 100,
            "kernel_ops": 50,
            "host_syncs_deepspeed": syncs,
            "accelerator_synchronize": 0,
        }

    report = {"command": "engine_overhead.py --sizes base", "batch": 256, "steps": 20, "precision": "bf16"}
    report["sizes"] = {"base": {"variants": {"plain": row(2.0, 0), "zero2-tuned": row(2.5, 3)}}}
    (tmp_path / "engine_overhead.json").write_text(json.dumps(report))
    engine = bench.collect(tmp_path)["stages"]["engine"]
    assert engine["source"] == "bench/engine_overhead.py"
    assert engine["variants"]["plain"]["samples_per_s"] == pytest.approx(2560.0)
    assert engine["variants"]["zero2-tuned"]["samples_per_s"] == pytest.approx(2048.0)
    assert engine["variants"]["zero2-tuned"]["vs_plain"] == pytest.approx(0.8)
    assert engine["variants"]["zero2-tuned"]["vs_hf"] == pytest.approx(0.8)
    assert (
        "| zero2-tuned | ok | X | - | 20 | 2048.0 | 125.0 | - | - | 0.80x | 0.80x | 100 | 50 | 3 | 0 |"
        in (tmp_path / "results.md").read_text()
    )
