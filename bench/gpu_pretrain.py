"""Stages of bench/gpu_pretrain.sh: one pre-training step split into loader, model, engine and full run.

    python bench/gpu_pretrain.py loader   --shards DIR --batch 256 --workers 8 --batches 80 --record R.json
    python bench/gpu_pretrain.py model    --shards DIR --size base --batch 256 --record R.json
    python bench/gpu_pretrain.py engine   --shards DIR --size base --deepspeed-config C.json --batch 256 \
        --record R.json
    python bench/gpu_pretrain.py pretrain --record R.json --warm-steps 48 -- <lxtrain/pretrain.py arguments>
    python bench/gpu_pretrain.py collect  OUT_DIR

Every stage runs in its own process and writes a record of raw counts and times (samples, seconds,
host timestamps); ``collect`` derives every rate from them, so the arithmetic lives in one place
and a test can check it against hand-made numbers. Every throughput figure is **total samples over
total time after a warm-up** (no medians: the 2026-11-28 H200 run reported the median of two
regimes, 580 samples/s, where total over time was ~412/s).

- ``loader``: the training loader alone, as pretrain.py builds it (examples/s after the first pass
  over its shared-memory batch ring, and that pass on its own).
- ``model``: forward + backward + clipping + torch fused AdamW of HF ``LxmertForPreTraining``
  (eager, bf16 autocast: the baseline), then lxtrain's ``PretrainingObjective`` eager,
  ``--compile default`` and ``--compile cudagraphs``, one after the other in one process on the
  same on-device batch; no DeepSpeed, no loader.
- ``engine``: lxtrain's objective through pretrain.py's DeepSpeed engine set-up (ZeRO stages of
  choice) against the plain torch step on the same model and batch, in one process.
- ``pretrain``: the real ``lxtrain/pretrain.py`` ``run`` with ``StepHooks`` that synchronise the
  GPU only at the warm-up boundary and at the last step, never per step.
- ``collect``: OUT_DIR/results.json and results.md, with ratios to HF and the issue's goals.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODEL_VARIANTS = ("hf", "eager", "default", "cudagraphs")
# The goals ("A pre-training step at hardware speed"), all at LXMERT-base, batch 256.
GOAL_BATCH, GOAL_SIZE = 256, "base"
GOAL_SPEEDUP_OVER_HF = 2.0
GOAL_MFU = 0.25
GOAL_DATA_WAIT = 0.02
FULL_RUNS = ("auto", "off")  # pretrain.py --compile modes of the full runs, the goals' run first
UNFINISHED = "did not finish (the stage's time limit, or the process died)"


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work; only ever called at a warm-up boundary or at the end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_record() -> dict[str, float | None]:
    if not torch.cuda.is_available():
        return {"peak_memory_gib": None, "peak_reserved_gib": None}
    return {
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def _write(path: Path, record: Mapping[str, Any]) -> None:
    """Written after every variant, so that a stage killed by its time limit keeps what it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _error_text(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:500]


def _model_config(shards: Path, size: str) -> Any:
    """The network pretrain.py builds for ``--model size`` on these shards (feature size, answers)."""
    from lxtrain.config import MODEL_PRESET_SIZES
    from lxtrain.data.index import open_index
    from lxtrain.model.config import LxmertConfig

    index = open_index(shards)
    return LxmertConfig(
        **MODEL_PRESET_SIZES[size], visual_feature_dim=index.feature_dim, num_qa_labels=len(index.answers)
    )


def _peak_and_flops(config: Any) -> dict[str, float | None]:
    from lxtrain.monitor import detect_peak_tflops, training_flops_per_sample

    return {"flops_per_sample": training_flops_per_sample(config), "peak_tflops": detect_peak_tflops()}


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """``warmup`` untimed calls, then ``steps`` timed ones; the device is synchronised only at the
    two boundaries, so the host queues ahead as it would in training. Raw times: ``collect`` divides."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _synchronize(device)
    warm_end = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    end = time.perf_counter()
    return {
        "warmup_steps": warmup,
        "warmup_s": warm_end - start,
        "timed_steps": steps,
        "timed_s": end - warm_end,
    }


def _adamw(params: list[torch.nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """torch's fused AdamW with pretrain.py's hyper-parameters (foreach where no fused kernel exists)."""
    options: dict[str, Any] = {"lr": 1e-4, "eps": 1e-6, "weight_decay": 0.01}
    try:
        return torch.optim.AdamW(params, fused=True, **options), "torch fused AdamW"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **options), "torch foreach AdamW"


def _plain_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss: Callable[[], torch.Tensor],
    device: torch.device,
    autocast: bool,
) -> Callable[[], None]:
    """One training step without an engine: bf16 autocast forward, backward, clip at 1.0 (pretrain.py's
    ``gradient_clipping``), AdamW, zero_grad. Nothing reads the device back."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------
# (a) loader


def ring_batches(workers: int) -> int:
    """Batches in the loader's first pass over its shared-memory ring: fresh pages, a slower pass."""
    from lxtrain.data.loader import RING_EXTRA_SLOTS, LoaderConfig

    return max(workers, 1) * (LoaderConfig.prefetch_factor + RING_EXTRA_SLOTS)


def run_loader(
    shards: Path, batch_size: int, workers: int, batches: int, warm: int | None, record: Path
) -> None:
    """The pre-training loader as pretrain.py builds it; the arrival time of every batch."""
    from lxtrain.data.loader import build_pretrain_loader

    pinned = torch.cuda.is_available()
    loader = build_pretrain_loader(shards, batch_size, num_workers=workers, pin_memory=pinned, strict=True)
    warm = ring_batches(workers) if warm is None else warm
    batches = min(batches, len(loader))
    arrivals: list[float] = []
    start = time.perf_counter()
    for number, _ in enumerate(loader):  # epoch 0 from its start, as a fresh run
        arrivals.append(time.perf_counter() - start)
        if number + 1 >= batches:
            break
    result = {"batch": batch_size, "workers": workers, "pin_memory": pinned, "warm_batches": warm}
    _write(record, {**result, "arrivals_s": arrivals})
    print(json.dumps({**result, **loader_figures({**result, "arrivals_s": arrivals})}))


def loader_figures(record: Mapping[str, Any]) -> dict[str, Any]:
    """Samples/s after the warm-up batches: (batches after batch ``warm``) x batch / (time from the
    arrival of batch ``warm`` to the last arrival). The warm-up pass: its batches over their time."""
    arrivals, batch, warm = record["arrivals_s"], record["batch"], record["warm_batches"]
    figures: dict[str, Any] = {
        "status": "ok" if arrivals else "no batch",
        "batches": len(arrivals),
        "first_batch_s": arrivals[0] if arrivals else None,
        "warm_samples_per_s": None,
        "samples_per_s": None,
    }
    if warm >= 1 and len(arrivals) >= warm:
        figures["warm_samples_per_s"] = warm * batch / arrivals[warm - 1]
    if len(arrivals) > warm:
        since = arrivals[warm - 1] if warm else 0.0  # no warm-up: from the loop's start
        figures["samples_per_s"] = (len(arrivals) - warm) * batch / (arrivals[-1] - since)
    elif arrivals:
        figures["status"] = f"only {len(arrivals)} batches, none after the {warm} warm-up batches"
    return figures


# ----------------------------------------------------------------------------------------------
# (b) model


def _use_compile_backend(backend: str) -> None:
    """Send lxtrain.compiling's torch.compile calls to another backend (the CPU dry run's aot_eager:
    Dynamo's full-graph trace and AOT autograd, checked in seconds, without Inductor's C++ build)."""
    if backend != "inductor":
        torch.compile = functools.partial(torch.compile, backend=backend)  # type: ignore[assignment]


def run_model(
    shards: Path,
    size: str,
    batch_size: int,
    warmup: int,
    steps: int,
    variants: list[str],
    compile_backend: str,
    record: Path,
) -> None:
    """HF eager, then lxtrain eager / compiled, one at a time on one device batch; same optimizer."""
    from model_step import synthetic_batch

    from lxtrain import compiling
    from lxtrain.tasks.objectives import TASKS

    _use_compile_backend(compile_backend)
    device = _device()
    config = _model_config(shards, size)
    batch = {key: value.to(device) for key, value in synthetic_batch(config, batch_size).items()}
    weights = dict.fromkeys(TASKS, 1.0)
    result: dict[str, Any] = {
        "size": size,
        "batch": batch_size,
        "device": str(device),
        "precision": "fp32 weights, bf16 autocast",
        "compile_backend": compile_backend,
        **_peak_and_flops(config),
        "variants": {},
    }
    for name in variants:
        _release(device)
        # On file before it runs: a variant the stage's time limit kills still shows in the report.
        result["variants"][name] = {"batch": batch_size, "status": UNFINISHED}
        _write(record, result)
        mode = "off" if name in ("hf", "eager") else name
        try:
            mode = compiling.resolve_compile_mode(mode, device, zero_stage=0)
        except ValueError as error:  # cudagraphs without CUDA
            result["variants"][name]["status"] = f"skipped: {_error_text(error)}"
        else:
            result["variants"][name] = _model_variant(
                name, mode, config, batch, weights, warmup, steps, device
            )
        print(json.dumps({name: result["variants"][name]}), flush=True)
        _write(record, result)
        torch._dynamo.reset()  # drops this variant's compiled graphs and CUDA-graph pools


def _model_variant(
    name: str,
    mode: str,
    config: Any,
    batch: dict[str, torch.Tensor],
    weights: dict[str, float],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """One model-stage variant from a fresh model (seed 0); its model and optimizer die on return."""
    import transformers

    from lxtrain import convert
    from lxtrain.model.lxmert import LxmertForPretraining
    from lxtrain.tasks.objectives import PretrainingObjective

    entry: dict[str, Any] = {"batch": len(next(iter(batch.values())))}
    try:
        torch.manual_seed(0)
        if name == "hf":
            with device:  # built in place: no CPU initialisation of 200M parameters
                model = transformers.LxmertForPreTraining(convert.hf_config(config))
            model = model.to(device).train()  # a no-op unless some tensor was made on an explicit device
            loss = _hf_loss(model, {**convert.hf_model_inputs(batch), **convert.hf_pretraining_labels(batch)})
        else:
            with device:
                model = LxmertForPretraining(config).to(device)
            loss = _objective_loss(PretrainingObjective(model, compile_mode=mode).train(), batch, weights)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, entry["optimizer"] = _adamw(params, device)
        step = _plain_step(params, optimizer, loss, device, autocast=True)
        entry.update(time_steps(step, warmup, steps, device), status="ok", **_memory_record())
    except Exception as error:  # e.g. a compile failure: recorded, the next variant still runs
        traceback.print_exc()
        entry["status"] = f"failed: {_error_text(error)}"
    return entry


def _hf_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], torch.Tensor]:
    return lambda: model(**inputs).loss


def _objective_loss(
    objective: torch.nn.Module, batch: dict[str, torch.Tensor], weights: dict[str, float]
) -> Callable[[], torch.Tensor]:
    return lambda: objective(batch, weights).total


# ----------------------------------------------------------------------------------------------
# (c) engine


def run_engine(
    shards: Path,
    size: str,
    deepspeed_config: Path,
    batch_size: int,
    warmup: int,
    steps: int,
    stages: list[int],
    record: Path,
) -> None:
    """The plain torch step, then the DeepSpeed engine at each ZeRO stage, on one model and batch.

    Engine steps are pretrain.py's: ``engine(batch, weights)``, ``engine.backward``, ``engine.step``,
    from pretrain.py's own config completion (``lxtrain.engine.prepare_deepspeed_config``) and
    ``initialize``. The plain step is the model stage's lxtrain eager step (fp32 weights, bf16
    autocast, torch fused AdamW); the engine keeps bf16 weights with fp32 master copies.
    """
    from model_step import synthetic_batch

    from lxtrain import distributed
    from lxtrain import engine as engine_setup
    from lxtrain.tasks.objectives import TASKS

    distributed.init()
    device = _device()
    config = _model_config(shards, size)
    batch = {key: value.to(device) for key, value in synthetic_batch(config, batch_size).items()}
    weights = dict.fromkeys(TASKS, 1.0)
    probe = engine_setup.prepare_deepspeed_config(
        deepspeed_config, world_size=1, total_steps=warmup + steps, warmup_fraction=0.1
    )
    bf16 = engine_setup.precision(probe) == "bf16"
    result: dict[str, Any] = {
        "size": size,
        "batch": batch_size,
        "device": str(device),
        "precision": engine_setup.precision(probe),
        **_peak_and_flops(config),
        "variants": {},
    }
    for name in ["plain", *(f"zero{stage}" for stage in stages)]:
        _release(device)
        result["variants"][name] = {"batch": batch_size, "status": UNFINISHED}
        _write(record, result)
        result["variants"][name] = _engine_variant(
            name, config, deepspeed_config, batch, weights, warmup, steps, device, bf16
        )
        print(json.dumps({name: result["variants"][name]}), flush=True)
        _write(record, result)


def _engine_variant(
    name: str,
    config: Any,
    deepspeed_config: Path,
    batch: dict[str, torch.Tensor],
    weights: dict[str, float],
    warmup: int,
    steps: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, Any]:
    """``plain`` or ``zeroN`` from a fresh model (seed 0); its model, engine, optimizer die on return."""
    from lxtrain import engine as engine_setup
    from lxtrain.model.lxmert import LxmertForPretraining
    from lxtrain.tasks.objectives import PretrainingObjective

    entry: dict[str, Any] = {"batch": len(next(iter(batch.values())))}
    try:
        torch.manual_seed(0)
        with device:
            objective = PretrainingObjective(LxmertForPretraining(config)).to(device).train()
        if name == "plain":
            params = [p for p in objective.parameters() if p.requires_grad]
            optimizer, entry["optimizer"] = _adamw(params, device)
            step = _plain_step(params, optimizer, _objective_loss(objective, batch, weights), device, bf16)
        else:
            ds_config = engine_setup.prepare_deepspeed_config(
                deepspeed_config, world_size=1, total_steps=warmup + steps, warmup_fraction=0.1
            )
            ds_config.setdefault("zero_optimization", {})["stage"] = int(name.removeprefix("zero"))
            engine = engine_setup.initialize(objective, ds_config)
            engine.train()
            inner = getattr(engine, "basic_optimizer", None)  # what the ZeRO wrapper steps
            fused = bool(getattr(inner, "defaults", {}).get("fused"))
            entry["optimizer"] = f"{type(engine.optimizer).__name__} over {type(inner).__name__}" + (
                " (fused)" if fused else ""
            )
            entry["zero_optimization"] = ds_config.get("zero_optimization")
            step = _engine_step(engine, batch, weights)
        entry.update(time_steps(step, warmup, steps, device), status="ok", **_memory_record())
    except Exception as error:
        traceback.print_exc()
        entry["status"] = f"failed: {_error_text(error)}"
    return entry


def _engine_step(
    engine: Any, batch: dict[str, torch.Tensor], weights: dict[str, float]
) -> Callable[[], None]:
    """pretrain.py's micro-batch at accumulation 1: forward, backward, step; nothing read back."""

    def step() -> None:
        output = engine(batch, weights)
        engine.backward(output.total)
        engine.step()

    return step


# ----------------------------------------------------------------------------------------------
# (d) the full pretrain.py


class _NoStop:
    """Stands in for pretrain.StopRequested: a stage time limit's SIGTERM must end the run at once
    (StopRequested would wait for a step boundary, then write a multi-GB checkpoint)."""

    signal_name: str | None = None


def run_pretrain(record_path: Path, warm_steps: int, pretrain_args: list[str]) -> int:
    """lxtrain/pretrain.py's ``run`` with timing hooks; writes the record (raw marks, no rates)."""
    from lxtrain import distributed, pretrain
    from lxtrain.config import parse_args
    from lxtrain.monitor import detect_peak_tflops, training_flops_per_sample
    from lxtrain.tasks import pretraining
    from lxtrain.train.loop import StepHooks

    cfg = parse_args(pretrain_args)
    start = time.perf_counter()
    record: dict[str, Any] = {
        "exit_code": "died before finishing",
        "compile_requested": cfg.compile,
        "warm_steps": warm_steps,
        "max_steps": cfg.max_steps,
        "log_every": cfg.log_every,
        "marks_s": {},
    }
    device = _device()

    class Timing(StepHooks):
        """Host time at every step end (no sync: what the CPU has issued), and device-synchronised
        marks at the end of warm-up and at ``--max-steps``."""

        def __init__(self) -> None:
            self.step_end_s: list[float] = []

        def step_ends(self, step: int) -> None:
            self.step_end_s.append(time.perf_counter() - start)
            record["steps_done"] = step
            if step in (warm_steps, cfg.max_steps):
                _synchronize(device)
                record["marks_s"][str(step)] = time.perf_counter() - start
                _write(record_path, {**record, "step_end_s": self.step_end_s})

    hooks = Timing()

    main_pid = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked loader worker (timeout signals the whole group)
            os._exit(1)
        record["exit_code"] = f"stopped by {signal.Signals(signum).name} (the stage's time limit)"
        record["wall_s"] = time.perf_counter() - start
        _write(record_path, {**record, "step_end_s": hooks.step_end_s})
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    engines: list[Any] = []
    build_engine = pretraining.build_engine

    def keep_engine(*args: Any, **kwargs: Any) -> Any:  # to read the compile mode the run resolved
        built = build_engine(*args, **kwargs)
        engines.append(built[0])
        return built

    pretraining.build_engine = keep_engine
    _write(record_path, record)
    try:
        info = distributed.init(cfg.collective_timeout_s)
        code = pretrain.run(cfg, info, _NoStop(), hooks)  # type: ignore[arg-type]
    except Exception as error:
        traceback.print_exc()
        record["error"] = _error_text(error)
        code = 1
    record.update(exit_code=code, wall_s=time.perf_counter() - start, **_memory_record())
    if engines:
        objective = engines[0].module
        record["compile_resolved"] = objective.compile_mode
        # --compile auto falls back to eager on a compile failure: the objective drops its graph.
        record["compiled"] = getattr(objective, "_compiled", None) is not None
    run_config = Path(cfg.output_dir) / "run_config.json"
    if run_config.exists():
        from lxtrain.model.config import LxmertConfig

        saved = json.loads(run_config.read_text())
        record["samples_per_step"] = saved["deepspeed"]["train_batch_size"]
        record["flops_per_sample"] = training_flops_per_sample(LxmertConfig(**saved["model"]))
        record["peak_tflops"] = cfg.peak_tflops or detect_peak_tflops()
        record["zero_stage"] = saved["deepspeed"].get("zero_optimization", {}).get("stage", 0)
        record["optimizer"] = saved["deepspeed"]["optimizer"]
    _write(record_path, {**record, "step_end_s": hooks.step_end_s})
    return int(code) if isinstance(code, int) else 1


def _windows(run_dir: Path) -> list[tuple[int, float, float | None]]:
    """(step, samples/s, data-wait share) of every logged window, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    if "train/samples_per_s" not in tags:
        return []
    waits = (
        {event.step: event.value for event in accumulator.Scalars("train/data_wait_share")}
        if "train/data_wait_share" in tags
        else {}
    )
    return [(e.step, e.value, waits.get(e.step)) for e in accumulator.Scalars("train/samples_per_s")]


def window_totals(
    windows: Iterable[tuple[int, float, float | None]], warm_steps: int, samples_per_step: int
) -> dict[str, float | int | None]:
    """Totals over the logged windows that start at or after ``warm_steps``.

    A window ending at step s after the log at step p holds (s - p) steps; its duration is their
    samples over its samples/s, and its wait is its data-wait share times that duration. Rates are
    the sums' quotients, never an average of the windows' rates. pretrain.py restarts a window's
    clock after logging, so window time leaves out the logging itself: the data-wait share here
    (wait over window time) can only be higher than over the whole run's time, never flattered.
    """
    previous, samples, seconds, wait, counted = 0, 0.0, 0.0, 0.0, 0
    wait_known = True
    for step, samples_per_s, share in sorted(windows):
        window_start, previous = previous, step
        if window_start < warm_steps or samples_per_s <= 0:
            continue
        window_samples = (step - window_start) * samples_per_step
        duration = window_samples / samples_per_s
        samples, seconds, counted = samples + window_samples, seconds + duration, counted + 1
        if share is None:
            wait_known = False
        else:
            wait += share * duration
    return {
        "windows": counted,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds else None,
        "data_wait_share": wait / seconds if seconds and wait_known else None,
    }


def pretrain_figures(record: Mapping[str, Any], windows: list[tuple[int, float, float | None]]) -> dict:
    """The full run's samples/s: (last step - warm-up steps) x samples per step over the synchronised
    time between the two marks; MFU from it; data wait from the windows after warm-up."""
    code = record.get("exit_code")
    figures: dict[str, Any] = {
        "status": "ok" if code == 0 else f"failed ({record.get('error') or code})",
        "compile": record.get("compile_requested"),
        "compile_resolved": record.get("compile_resolved"),
        "compiled": record.get("compiled"),
        "steps_done": record.get("steps_done"),
        "samples_per_s": None,
        "mfu": None,
        "data_wait_share": None,
        "peak_memory_gib": record.get("peak_memory_gib"),
        "wall_s": record.get("wall_s"),
    }
    step_ends = record.get("step_end_s") or []
    figures["first_step_s"] = step_ends[0] if step_ends else None  # host time from start: compile included
    warm, last, per_step = record.get("warm_steps"), record.get("max_steps"), record.get("samples_per_step")
    marks = record.get("marks_s", {})
    if isinstance(last, int) and str(warm) in marks and str(last) in marks and per_step and last > warm:
        timed_steps = last - warm
        timed_s = marks[str(last)] - marks[str(warm)]
        figures.update(
            timed_steps=timed_steps, timed_s=timed_s, samples_per_s=timed_steps * per_step / timed_s
        )
        figures["step_ms"] = 1e3 * timed_s / timed_steps
        if record.get("flops_per_sample") and record.get("peak_tflops"):
            figures["mfu"] = (
                figures["samples_per_s"] * record["flops_per_sample"] / (record["peak_tflops"] * 1e12)
            )
    elif figures["status"] == "ok":
        figures["status"] = (
            f"no timed steps (reached step {record.get('steps_done')}, warm-up {warm}, last {last})"
        )
    if per_step and warm is not None:
        totals = window_totals(windows, warm, per_step)
        figures["data_wait_share"] = totals["data_wait_share"]
        figures["windows_after_warmup"] = totals
    return figures


# ----------------------------------------------------------------------------------------------
# report


def timed_figures(
    entry: Mapping[str, Any], flops_per_sample: float | None, peak_tflops: float | None
) -> dict:
    """A model/engine variant: batch x timed steps over the timed seconds."""
    figures = {
        key: entry.get(key) for key in ("status", "optimizer", "warmup_s", "timed_steps", "peak_memory_gib")
    }
    figures["samples_per_s"] = figures["mfu"] = figures["step_ms"] = None
    if entry.get("status") == "ok" and entry.get("timed_steps") and entry.get("timed_s"):
        figures["samples_per_s"] = entry["batch"] * entry["timed_steps"] / entry["timed_s"]
        figures["step_ms"] = 1e3 * entry["timed_s"] / entry["timed_steps"]
        if flops_per_sample and peak_tflops:
            figures["mfu"] = figures["samples_per_s"] * flops_per_sample / (peak_tflops * 1e12)
    return figures


def engine_overhead_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """Stage (c) from bench/engine_overhead.py's JSON (one model size): samples/s is batch x timed
    steps over each variant's total wall time (its steps alternate and each is synchronised)."""
    (size, result), *_ = report["sizes"].items()
    batch, steps = report["batch"], report["steps"]
    variants = {}
    for name, row in result["variants"].items():
        wall = row.get("total_wall_s")
        variants[name] = {
            "status": "ok" if wall else "no time",
            "optimizer": row.get("optimizer"),
            "warmup_s": None,
            "timed_steps": steps,
            "peak_memory_gib": None,
            "samples_per_s": batch * steps / wall if wall else None,
            "step_ms": 1e3 * wall / steps if wall else None,
            "mfu": None,
            "aten_ops": row.get("aten_ops"),
            "kernel_ops": row.get("kernel_ops"),
            "host_syncs_deepspeed": row.get("host_syncs_deepspeed"),
            "accelerator_synchronize": row.get("accelerator_synchronize"),
        }
    keys = ("precision", "batch", "steps", "warmup", "device", "command")
    return {"source": "bench/engine_overhead.py", "size": size, **{key: report.get(key) for key in keys}} | {
        "variants": variants
    }


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _stage_times(path: Path) -> list[dict[str, Any]]:
    """gpu_pretrain.sh's stages.tsv: name, status, seconds used, seconds allowed."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, used, limit = line.split("\t")
        rows.append({"stage": name, "status": status, "seconds": int(used), "limit_s": int(limit)})
    return rows


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top and bottom else None


def collect(out_dir: Path) -> dict:
    """OUT_DIR/results.json and results.md from the stages' records."""
    environment = _read(out_dir / "environment.json") or {}
    stages: dict[str, Any] = {}
    loader = _read(out_dir / "loader.json")
    stages["loader"] = (
        {
            **loader_figures(loader),
            **{k: loader[k] for k in ("batch", "workers", "warm_batches", "pin_memory")},
        }
        if loader
        else None
    )
    for stage in ("model", "engine"):
        record = _read(out_dir / f"{stage}.json")
        if record is None:
            stages[stage] = None
            continue
        flops, peak = record.get("flops_per_sample"), record.get("peak_tflops")
        variants = {name: timed_figures(entry, flops, peak) for name, entry in record["variants"].items()}
        stages[stage] = {key: value for key, value in record.items() if key != "variants"} | {
            "variants": variants
        }
    overhead = _read(out_dir / "engine_overhead.json")
    if overhead is not None:  # stage (c) ran as bench/engine_overhead.py
        stages["engine"] = engine_overhead_figures(overhead)
    stages["pretrain"] = {}
    for mode in FULL_RUNS:
        run_dir = out_dir / "runs" / mode
        record = _read(run_dir / "record.json")
        if record is not None:
            windows = _windows(run_dir) if (run_dir / "tensorboard").exists() else []
            stages["pretrain"][mode] = pretrain_figures(record, windows)

    hf = ((stages.get("model") or {}).get("variants") or {}).get("hf", {}).get("samples_per_s")
    ratios: dict[str, float | None] = {}
    if stages["loader"]:
        ratios["loader"] = _ratio(stages["loader"]["samples_per_s"], hf)
    for stage in ("model", "engine"):
        for name, figures in ((stages.get(stage) or {}).get("variants") or {}).items():
            figures["vs_hf"] = ratios[f"{stage}/{name}"] = _ratio(figures["samples_per_s"], hf)
    engine = (stages.get("engine") or {}).get("variants") or {}
    for figures in engine.values():
        figures["vs_plain"] = _ratio(figures["samples_per_s"], engine.get("plain", {}).get("samples_per_s"))
    for mode, figures in stages["pretrain"].items():
        figures["vs_hf"] = ratios[f"pretrain/{mode}"] = _ratio(figures["samples_per_s"], hf)
    results = {
        "environment": environment,
        "stages": stages,
        "ratios_to_hf": ratios,
        "goals": goals(stages, hf, environment),
        "stage_times": _stage_times(out_dir / "stages.tsv"),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out_dir / "results.md").write_text(text)
    print(text)
    return results


def goals(stages: Mapping[str, Any], hf: float | None, environment: Mapping[str, Any]) -> dict[str, dict]:
    """The issue's three goals against the ``--compile auto`` full run: met, not met, or not measured."""
    full = stages.get("pretrain", {}).get("auto") or {}
    speedup = _ratio(full.get("samples_per_s"), hf)
    values = {
        "full_step_over_hf": (
            speedup,
            speedup is not None and speedup >= GOAL_SPEEDUP_OVER_HF,
            GOAL_SPEEDUP_OVER_HF,
        ),
        "mfu": (full.get("mfu"), full.get("mfu") is not None and full["mfu"] >= GOAL_MFU, GOAL_MFU),
        "data_wait_share": (
            full.get("data_wait_share"),
            full.get("data_wait_share") is not None and full["data_wait_share"] < GOAL_DATA_WAIT,
            GOAL_DATA_WAIT,
        ),
    }
    setting = environment.get("batch") == GOAL_BATCH and environment.get("size") == GOAL_SIZE
    return {
        name: {
            "value": value,
            "target": target,
            "met": None if value is None else met,
            "goal_setting": setting,
        }
        for name, (value, met, target) in values.items()
    }


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _verdict(goal: Mapping[str, Any]) -> str:
    return "not measured" if goal["met"] is None else "MET" if goal["met"] else "NOT MET"


def markdown(results: Mapping[str, Any]) -> str:
    env, stages, goal = results["environment"], results["stages"], results["goals"]
    hf = ((stages.get("model") or {}).get("variants") or {}).get("hf", {}).get("samples_per_s")
    full = stages["pretrain"].get("auto") or {}
    setting = (
        ""
        if goal["mfu"]["goal_setting"]
        else (
            f" (this run: {env.get('size', '?')} model, batch {env.get('batch', '?')}, not the goals' base model at batch "
            f"{GOAL_BATCH}: a check of the script, not of the goals)"
        )
    )
    lines = [
        "# Pre-training step, split into stages",
        "",
        f"Device: {env.get('gpu', '?')}; torch {env.get('torch', '?')}, deepspeed {env.get('deepspeed', '?')}, "
        f"transformers {env.get('transformers', '?')}; LXMERT-{env.get('size', '?')}, batch {env.get('batch', '?')}; "
        f"command `{env.get('command', '?')}`.",
        "Every samples/s is total samples over total time after warm-up (no medians); 'vs HF' divides by HF "
        "LxmertForPreTraining's eager bf16-autocast step in stage (b).",
        "",
        f"## Goals{setting}",
        "",
        f"- Full step >= {GOAL_SPEEDUP_OVER_HF:.0f}x HF's eager bf16 step at batch {GOAL_BATCH}: "
        f"**{_verdict(goal['full_step_over_hf'])}**: pretrain.py --compile auto "
        f"{_fmt(full.get('samples_per_s'), '{:.1f}')} samples/s vs HF {_fmt(hf, '{:.1f}')} samples/s = "
        f"{_fmt(goal['full_step_over_hf']['value'], '{:.2f}x')}.",
        f"- MFU >= {GOAL_MFU:.0%}: **{_verdict(goal['mfu'])}**: {_fmt(goal['mfu']['value'], '{:.1%}')}"
        + (
            ""
            if goal["mfu"]["value"] is not None
            else " (no known peak FLOP/s for this device, or no timed steps)"
        )
        + ".",
        f"- Data wait < {GOAL_DATA_WAIT:.0%}: **{_verdict(goal['data_wait_share'])}**: "
        f"{_fmt(goal['data_wait_share']['value'], '{:.1%}')} of the logged windows' time after warm-up.",
        "",
    ]
    loader = stages.get("loader")
    lines += ["## (a) Loader alone", ""]
    if loader:
        lines += [
            "| workers | batch | pinned | first batch | warm-up batches | warm-up samples/s | batches after | samples/s | vs HF |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {loader['workers']} | {loader['batch']} | {loader['pin_memory']} | {_fmt(loader['first_batch_s'], '{:.1f} s')} "
            f"| {loader['warm_batches']} | {_fmt(loader['warm_samples_per_s'], '{:.0f}')} "
            f"| {max(loader['batches'] - loader['warm_batches'], 0)} | {_fmt(loader['samples_per_s'], '{:.0f}')} "
            f"| {_fmt(results['ratios_to_hf'].get('loader'), '{:.2f}x')} |",
        ]
    else:
        lines.append("Not run.")
    for stage, title, extra in (
        (
            "model",
            "(b) Model step: one process, one on-device batch, fp32 weights + bf16 autocast, same optimizer",
            None,
        ),
        (
            "engine",
            "(c) Engine overhead: lxtrain eager, plain torch step vs DeepSpeed engine, one process",
            "vs_plain",
        ),
    ):
        lines += ["", f"## {title}", ""]
        record = stages.get(stage)
        if not record:
            lines.append("Not run.")
            continue
        counts = stage == "engine" and record.get("source") == "bench/engine_overhead.py"
        if counts:
            lines.append(
                f"From `{record.get('command')}` (its own feature and answer sizes): the variants' steps "
                "alternate, each synchronised; ops and syncs counted over one more step per variant."
            )
            lines.append("")
        lines += [
            "| variant | status | optimizer | warm-up s (compile included) | timed steps | samples/s | ms/step | MFU "
            f"| peak GiB | vs HF |{' vs plain |' if extra else ''}"
            + (" aten ops | kernel ops | DeepSpeed host syncs | accelerator.synchronize |" if counts else ""),
            "|---|---|---|---|---|---|---|---|---|---|"
            + ("---|" if extra else "")
            + ("---|" * 4 if counts else ""),
        ]
        for name, row in record["variants"].items():
            lines.append(
                f"| {name} | {row['status']} | {row.get('optimizer') or '-'} | {_fmt(row['warmup_s'], '{:.1f}')} "
                f"| {row['timed_steps'] or '-'} | {_fmt(row['samples_per_s'], '{:.1f}')} | {_fmt(row['step_ms'], '{:.1f}')} "
                f"| {_fmt(row['mfu'], '{:.1%}')} | {_fmt(row['peak_memory_gib'], '{:.1f}')} | {_fmt(row['vs_hf'], '{:.2f}x')} |"
                + (f" {_fmt(row.get(extra), '{:.2f}x')} |" if extra else "")
                + (
                    "".join(
                        f" {row.get(key, '-')} |"
                        for key in (
                            "aten_ops",
                            "kernel_ops",
                            "host_syncs_deepspeed",
                            "accelerator_synchronize",
                        )
                    )
                    if counts
                    else ""
                )
            )
    lines += ["", "## (d) Full lxtrain/pretrain.py (DeepSpeed, the real loader), timed through StepHooks", ""]
    if stages["pretrain"]:
        lines += [
            "| --compile | status | resolved | step 1 done at (s) | timed steps | samples/s | ms/step | MFU | data wait "
            "| windows' samples/s | peak GiB | vs HF |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, row in stages["pretrain"].items():
            resolved = row.get("compile_resolved") or "-"
            if row.get("compiled") is False and resolved != "off":
                resolved += " (fell back to eager)"
            windows = row.get("windows_after_warmup") or {}
            lines.append(
                f"| {mode} | {row['status']} | {resolved} | {_fmt(row['first_step_s'], '{:.1f}')} "
                f"| {row.get('timed_steps', '-')} | {_fmt(row['samples_per_s'], '{:.1f}')} | {_fmt(row.get('step_ms'), '{:.1f}')} "
                f"| {_fmt(row['mfu'], '{:.1%}')} | {_fmt(row['data_wait_share'], '{:.1%}')} "
                f"| {_fmt(windows.get('samples_per_s'), '{:.1f}')} | {_fmt(row['peak_memory_gib'], '{:.1f}')} "
                f"| {_fmt(row['vs_hf'], '{:.2f}x')} |"
            )
        lines.append(
            "\nsamples/s: steps after warm-up x batch over the time between two device-synchronised marks "
            "(end of the warm-up step, end of the last step), logging included. Windows' samples/s and data "
            "wait: the logged windows after warm-up, summed (logging excluded). 'step 1 done at': host "
            "seconds from the stage's start (process set-up, engine, loader start and compiling included)."
        )
    else:
        lines.append("Not run.")
    times = results.get("stage_times") or []
    if times:
        lines += [
            "",
            "## Stage wall times (this run)",
            "",
            "| stage | status | seconds | limit |",
            "|---|---|---|---|",
        ]
        lines += [f"| {t['stage']} | {t['status']} | {t['seconds']} | {t['limit_s']} |" for t in times]
        lines.append(f"\nTotal: {sum(t['seconds'] for t in times)} s.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    loader = commands.add_parser("loader", help="(a) the pre-training loader alone")
    loader.add_argument("--shards", type=Path, required=True)
    loader.add_argument("--batch", type=int, required=True)
    loader.add_argument("--workers", type=int, default=8)
    loader.add_argument("--batches", type=int, default=80, help="batches to read, warm-up included")
    loader.add_argument(
        "--warm", type=int, default=None, help="warm-up batches (default: the ring's first pass)"
    )
    loader.add_argument("--record", type=Path, required=True)

    for name, help_text in (
        ("model", "(b) HF vs lxtrain eager/compiled"),
        ("engine", "(c) plain vs DeepSpeed"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--shards", type=Path, required=True, help="the training shards (for sizes only)")
        sub.add_argument("--size", default="base", help="model preset (lxtrain.config.MODEL_PRESETS)")
        sub.add_argument("--batch", type=int, required=True)
        sub.add_argument(
            "--warmup", type=int, default=5, help="untimed steps per variant (compiling included)"
        )
        sub.add_argument("--steps", type=int, default=20, help="timed steps per variant")
        sub.add_argument("--record", type=Path, required=True)
        if name == "model":
            sub.add_argument("--variants", nargs="+", choices=MODEL_VARIANTS, default=list(MODEL_VARIANTS))
            sub.add_argument(
                "--compile-backend", default="inductor", help="torch.compile backend (dry run: aot_eager)"
            )
        else:
            sub.add_argument("--deepspeed-config", type=Path, required=True)
            sub.add_argument("--stages", nargs="+", type=int, choices=(0, 1, 2), default=[2, 1])

    pretrain = commands.add_parser("pretrain", help="(d) lxtrain/pretrain.py, timed through StepHooks")
    pretrain.add_argument("--record", type=Path, required=True)
    pretrain.add_argument(
        "--warm-steps", type=int, required=True, help="untimed steps (compile, loader ring)"
    )
    pretrain.add_argument("pretrain_args", nargs=argparse.REMAINDER)

    report = commands.add_parser("collect", help="write results.json and results.md")
    report.add_argument("out_dir", type=Path)

    args = parser.parse_args(argv)
    if args.command == "loader":
        run_loader(args.shards, args.batch, args.workers, args.batches, args.warm, args.record)
    elif args.command == "model":
        run_model(
            args.shards,
            args.size,
            args.batch,
            args.warmup,
            args.steps,
            args.variants,
            args.compile_backend,
            args.record,
        )
    elif args.command == "engine":
        run_engine(
            args.shards,
            args.size,
            args.deepspeed_config,
            args.batch,
            args.warmup,
            args.steps,
            args.stages,
            args.record,
        )
    elif args.command == "pretrain":
        forwarded = args.pretrain_args[1:] if args.pretrain_args[:1] == ["--"] else args.pretrain_args
        return run_pretrain(args.record, args.warm_steps, forwarded)
    else:
        collect(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
