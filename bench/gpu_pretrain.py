"""Helpers of bench/gpu_pretrain.sh: run pre-training with a memory record, the HF baseline, and the report.

    python bench/gpu_pretrain.py pretrain --record R.json -- <lxtrain/pretrain.py arguments>
    python bench/gpu_pretrain.py hf --shards DIR --batch 256 --steps 30 --record R.json
    python bench/gpu_pretrain.py loader --shards DIR --batch 256 --workers 8 --record R.json
    python bench/gpu_pretrain.py engine --shards DIR --deepspeed-config C.json --batch 256 --record R.json
    python bench/gpu_pretrain.py collect OUT_DIR

``pretrain`` calls the real ``lxtrain/pretrain.py`` entry point in this process, so the peak GPU
memory of the run can be read afterwards; throughput and MFU are what pretrain.py itself logs to
TensorBoard (``train/samples_per_s``, ``train/mfu``), read back by ``collect``.

``hf`` times HF's model and then lxtrain's model (each attention backend) in the same process, on
the same on-GPU batch with the same optimizer: the model-alone comparison, without DeepSpeed and
without data loading. ``engine`` times lxtrain's model and objective through the DeepSpeed engine of
the full runs (same config, a ZeRO stage of choice) on that on-GPU batch: DeepSpeed without the
loader. ``loader`` times the training loader alone (no GPU work). Together with the full runs they
say where a pre-training step's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BACKENDS = ("eager", "sdpa", "fused")
WARM_WINDOWS = 2  # logged windows dropped when the report does not say how many steps were warm-up
LOADER_RING_PER_WORKER = 2 + 4  # at most prefetch_factor 2 + lxtrain.data.loader.RING_EXTRA_SLOTS segments


def _memory_record() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {"peak_memory_gib": None, "peak_reserved_gib": None}
    return {
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def run_pretrain(record: Path, pretrain_args: list[str]) -> int:
    """lxtrain/pretrain.py's ``main`` with these arguments; writes exit code, wall time and peak memory."""
    from lxtrain import pretrain

    # pretrain.py ends a failed run with os._exit (so no rank hangs in a collective): leave a record
    # that says so unless the run gets to overwrite it.
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"exit_code": "died before finishing"}) + "\n")
    start = time.monotonic()
    try:
        code = pretrain.main(pretrain_args)
    except SystemExit as exit_:  # argument errors exit through argparse
        code = exit_.code if isinstance(exit_.code, int) else 1
    record.write_text(
        json.dumps({"exit_code": code, "wall_s": time.monotonic() - start, **_memory_record()}, indent=2)
        + "\n"
    )
    return int(code or 0)


def _time_steps(step: Callable[[], float], steps: int, warmup: int, cuda: bool) -> float:
    """Median seconds of ``step`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def run_hf(
    shards: Path, batch_size: int, steps: int, warmup: int, record: Path, lxtrain_backends: list[str]
) -> None:
    """HF ``LxmertForPreTraining``, then lxtrain's model per attention backend, alike: samples/s, MFU, memory.

    LXMERT-base with the corpus's feature size and answer count (from the shard index), fp32
    weights under bf16 autocast, torch's fused AdamW, gradient clipping at 1.0 (pretrain.py's), the
    same synthetic batch already on the GPU: no DeepSpeed and no data loading for either. HF goes to
    ``record``, lxtrain's models to ``lxtrain_models.json`` beside it.
    """
    import transformers
    from model_step import step_functions, synthetic_batch

    from lxtrain import convert
    from lxtrain.model.config import LxmertConfig
    from lxtrain.model.lxmert import LxmertForPretraining
    from lxtrain.monitor import detect_peak_tflops, training_flops_per_sample

    index = json.loads((shards / "index.json").read_text())
    config = LxmertConfig(visual_feature_dim=index["feature_dim"], num_qa_labels=index["answers"]["count"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batch = {key: value.to(device) for key, value in synthetic_batch(config, batch_size).items()}
    peak = detect_peak_tflops()
    flops = training_flops_per_sample(config)

    def measure(model: torch.nn.Module, forward_backward: Callable[[], float]) -> dict:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01, fused=cuda)

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward_backward()  # zero_grad + forward + loss + backward + .item() (one sync)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss

        samples_per_s = batch_size / _time_steps(step, steps, warmup, cuda)
        return {
            "samples_per_s": samples_per_s,
            "mfu": samples_per_s * flops / (peak * 1e12) if peak else None,
            "batch": batch_size,
            "steps": steps,
            "precision": "fp32 weights, bf16 autocast, torch fused AdamW",
            **_memory_record(),
        }

    values = convert.config_to_hf(config)
    values.pop("model_type")
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**values)).to(device).train()
    result = measure(hf, step_functions(config, hf, None, batch)["hf"])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"hf": result}))
    del hf
    models = {}
    for backend in lxtrain_backends:
        torch.manual_seed(0)
        model = LxmertForPretraining(dataclasses.replace(config, attention_backend=backend))
        try:
            model = model.to(device).train()
            models[backend] = measure(model, step_functions(config, None, model, batch)["lxtrain"])
        except Exception as error:  # e.g. fused forced without a GPU: recorded, the others still run
            models[backend] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps({f"lxtrain_{backend}": models[backend]}))
        del model
        if cuda:
            torch.cuda.empty_cache()
    (record.parent / "lxtrain_models.json").write_text(json.dumps(models, indent=2) + "\n")


def run_engine(
    shards: Path,
    deepspeed_config: Path,
    batch_size: int,
    steps: int,
    warmup: int,
    record: Path,
    stage: int | None,
) -> None:
    """lxtrain's objective through DeepSpeed (pretrain.py's engine set-up) on a fixed on-device batch.

    A step is what pretrain.py does per micro-batch minus the loader and the metric bookkeeping:
    forward with every task weighted 1, ``engine.backward``, ``engine.step``, and one ``float`` of the
    loss (pretrain.py syncs at least that often). ``stage`` overrides the config's ZeRO stage.
    """
    from model_step import synthetic_batch

    from lxtrain import distributed
    from lxtrain import engine as engine_setup
    from lxtrain.model.config import LxmertConfig
    from lxtrain.model.lxmert import LxmertForPretraining
    from lxtrain.monitor import detect_peak_tflops, training_flops_per_sample
    from lxtrain.tasks.objectives import RELEASE_VISUAL_LOSS_NORMALIZER, TASKS, PretrainingObjective

    distributed.init()
    index = json.loads((shards / "index.json").read_text())
    config = LxmertConfig(visual_feature_dim=index["feature_dim"], num_qa_labels=index["answers"]["count"])
    torch.manual_seed(0)
    objective = PretrainingObjective(LxmertForPretraining(config), RELEASE_VISUAL_LOSS_NORMALIZER)
    ds_config = engine_setup.prepare_deepspeed_config(
        deepspeed_config, world_size=1, total_steps=steps + warmup, warmup_fraction=0.1
    )
    if stage is not None:
        ds_config.setdefault("zero_optimization", {})["stage"] = stage
    engine = engine_setup.initialize(objective, ds_config)
    batch = {key: value.to(engine.device) for key, value in synthetic_batch(config, batch_size).items()}
    weights = dict.fromkeys(TASKS, 1.0)
    cuda = engine.device.type == "cuda"

    def step() -> float:
        output = engine(batch, weights)
        engine.backward(output.total)
        engine.step()
        return float(output.total.detach())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    samples_per_s = batch_size / _time_steps(step, steps, warmup, cuda)
    peak = detect_peak_tflops()
    result = {
        "samples_per_s": samples_per_s,
        "mfu": samples_per_s * training_flops_per_sample(config) / (peak * 1e12) if peak else None,
        "batch": batch_size,
        "steps": steps,
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "precision": engine_setup.precision(ds_config),
        "optimizer": ds_config["optimizer"]["type"]
        + (" (torch)" if ds_config["optimizer"]["params"].get("torch_adam") else ""),
        **_memory_record(),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def run_loader(shards: Path, batch_size: int, workers: int, batches: int, record: Path) -> None:
    """The pre-training loader alone, as pretrain.py builds it: the first batch, the first pass over the
    shared-memory batch ring (fresh pages: slow), and the steady rate after it, in samples/s."""
    from lxtrain.data.loader import build_pretrain_loader

    loader = build_pretrain_loader(
        shards, batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(), strict=True
    )
    ring = max(workers, 1) * LOADER_RING_PER_WORKER
    batches = min(batches, len(loader))
    arrivals = []
    start = time.perf_counter()
    for batch_number, _ in enumerate(loader):  # epoch 0 from its start
        arrivals.append(time.perf_counter() - start)
        if batch_number + 1 >= batches:
            break

    def rate(first: int, last: int) -> float | None:  # samples/s between the arrivals of two batches
        return (last - first) * batch_size / (arrivals[last] - arrivals[first]) if last > first else None

    result = {
        "first_batch_s": arrivals[0],
        "ring_pass_samples_per_s": rate(0, min(ring, len(arrivals)) - 1),
        "samples_per_s": rate(ring - 1, len(arrivals) - 1) if len(arrivals) > ring else None,
        "batches": len(arrivals),
        "ring_batches": ring,
        "batch": batch_size,
        "workers": workers,
        "pin_memory": torch.cuda.is_available(),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


def _median_after_warmup(
    events: list[tuple[int, float]], warm_steps: int | None, log_every: int | None
) -> float | None:
    """Median over the logged windows that start after ``warm_steps`` (else after the first two)."""
    if warm_steps is not None and log_every:
        kept = [value for step, value in events if step - log_every >= warm_steps]
    else:
        kept = [value for _, value in events[WARM_WINDOWS:]]
    kept = kept or [value for _, value in events[-1:]]
    return statistics.median(kept) if kept else None


def collect(out_dir: Path) -> dict:
    """OUT_DIR/results.json and OUT_DIR/results.md from the runs' TensorBoard events and records."""
    environment = json.loads((out_dir / "environment.json").read_text())
    rows = {}
    for backend in BACKENDS:
        run_dir = out_dir / "runs" / backend
        record_path = run_dir / "record.json"
        if not record_path.exists():
            rows[backend] = {"status": "not run"}
            continue
        record = json.loads(record_path.read_text())
        row = {
            "status": "ok" if record["exit_code"] == 0 else f"failed (exit {record['exit_code']})",
            **record,
        }
        if (run_dir / "tensorboard").exists():
            scalars = _scalars(run_dir)
            warm, every = environment.get("warm_steps"), environment.get("log_every")
            for tag in ("samples_per_s", "mfu", "data_wait_share"):
                row[tag] = _median_after_warmup(scalars.get(f"train/{tag}", []), warm, every)
            row["windows"] = len(scalars.get("train/samples_per_s", []))
        rows[backend] = row
    hf_path = out_dir / "hf" / "record.json"
    rows["hf"] = (
        {"status": "ok", **json.loads(hf_path.read_text())} if hf_path.exists() else {"status": "not run"}
    )
    models_path = out_dir / "hf" / "lxtrain_models.json"
    for backend, record in (json.loads(models_path.read_text()) if models_path.exists() else {}).items():
        status = f"failed ({record['error']})" if "error" in record else "ok"
        rows[f"model_{backend}"] = {"status": status, **record}
    for path in sorted((out_dir / "engine").glob("zero*.json")):
        rows[f"engine_{path.stem}"] = {"status": "ok", **json.loads(path.read_text())}
    loader_path = out_dir / "loader" / "record.json"
    loader = json.loads(loader_path.read_text()) if loader_path.exists() else None

    def ratio(numerator: str, denominator: str) -> float | None:
        top, bottom = rows[numerator].get("samples_per_s"), rows[denominator].get("samples_per_s")
        return top / bottom if top and bottom else None

    ratios = {}
    for name in rows:
        if name == "hf":
            continue
        ratios[f"{name}_over_hf"] = ratio(name, "hf")
        # Full runs against the full SDPA run; model-alone and engine rows against the model alone
        # with SDPA (for the engine rows: what DeepSpeed adds to the same model and batch).
        base = "sdpa" if name in BACKENDS else "model_sdpa"
        if name != base and base in rows:
            ratios[f"{name}_over_sdpa"] = ratio(name, base)
    results = {**environment, "runs": rows, "throughput_ratios": ratios, "loader_alone": loader}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return results


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _markdown(results: dict) -> str:
    lines = [
        f"GPU: {results.get('gpu', '?')}; torch {results.get('torch', '?')}, triton {results.get('triton', '?')}, "
        f"deepspeed {results.get('deepspeed', '?')}, optimizer {results.get('optimizer', '?')}; "
        f"micro-batch {results.get('batch', '?')}, "
        f"{results.get('steps', '?')} steps per run, medians over the windows after step "
        f"{results.get('warm_steps', '?')}; command: `{results.get('command', '?')}`",
        "",
        "| run | status | samples/s | MFU | peak memory (GiB) | data wait | vs HF | vs SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = results["throughput_ratios"]
    names = {"eager": "lxtrain eager (DeepSpeed bf16)", "sdpa": "lxtrain sdpa (DeepSpeed bf16)"}
    names |= {"fused": "lxtrain fused (DeepSpeed bf16)", "hf": "HF LxmertForPreTraining (bf16 autocast)"}
    for name, row in results["runs"].items():
        label = names.get(name) or (
            f"lxtrain model alone, {name.removeprefix('model_')} (bf16 autocast)"
            if name.startswith("model_")
            else f"lxtrain via DeepSpeed {name.removeprefix('engine_').replace('zero', 'ZeRO-')}, sdpa, no loader"
        )
        lines.append(
            f"| {label} | {row['status']} | {_format(row.get('samples_per_s'), '{:.1f}')} "
            f"| {_format(row.get('mfu'), '{:.1%}')} | {_format(row.get('peak_memory_gib'), '{:.1f}')} "
            f"| {_format(row.get('data_wait_share'), '{:.1%}')} "
            f"| {_format(ratios.get(f'{name}_over_hf'), '{:.2f}x')} "
            f"| {_format(ratios.get(f'{name}_over_sdpa'), '{:.2f}x')} |"
        )
    lines += [
        "",
        "The HF row and the model-alone rows share one process, one on-GPU batch and torch's fused AdamW "
        "(no DeepSpeed, no data loading); the 'via DeepSpeed' rows run the same batch through pretrain.py's "
        "engine set-up; the '(DeepSpeed bf16)' rows are whole pretrain.py runs with the real loader. "
        "'vs SDPA' compares full runs with the full SDPA run, and the other lxtrain rows with the model "
        "alone on SDPA.",
    ]
    loader = results.get("loader_alone")
    if loader:
        lines.append(
            f"Loader alone ({loader['workers']} workers, batch {loader['batch']}, pinned: {loader['pin_memory']}): "
            f"first batch in {loader['first_batch_s']:.1f} s; {_format(loader.get('ring_pass_samples_per_s'), '{:.0f}')} "
            f"samples/s over the first {loader.get('ring_batches', '?')} batches (the shared-memory ring's first "
            f"pass), {_format(loader['samples_per_s'], '{:.0f}')} samples/s after it ({loader['batches']} batches)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="run lxtrain/pretrain.py and record peak memory")
    pretrain.add_argument("--record", type=Path, required=True)
    pretrain.add_argument("pretrain_args", nargs=argparse.REMAINDER)
    hf = commands.add_parser("hf", help="time HF LxmertForPreTraining under bf16 autocast")
    hf.add_argument("--shards", type=Path, required=True, help="the training shards (for sizes only)")
    hf.add_argument("--batch", type=int, required=True)
    hf.add_argument("--steps", type=int, default=30)
    hf.add_argument("--warmup", type=int, default=5)
    hf.add_argument("--record", type=Path, required=True)
    hf.add_argument(
        "--lxtrain-backends", default="sdpa,fused", help="lxtrain attention backends to time after HF"
    )
    loader = commands.add_parser("loader", help="time the pre-training loader alone")
    loader.add_argument("--shards", type=Path, required=True)
    loader.add_argument("--batch", type=int, required=True)
    loader.add_argument("--workers", type=int, default=8)
    loader.add_argument("--batches", type=int, default=30)
    loader.add_argument("--record", type=Path, required=True)
    engine = commands.add_parser("engine", help="time lxtrain through the DeepSpeed engine, no loader")
    engine.add_argument("--shards", type=Path, required=True, help="the training shards (for sizes only)")
    engine.add_argument("--deepspeed-config", type=Path, required=True)
    engine.add_argument("--batch", type=int, required=True)
    engine.add_argument("--steps", type=int, default=30)
    engine.add_argument("--warmup", type=int, default=5)
    engine.add_argument("--zero-stage", type=int, default=None, help="override the config's ZeRO stage")
    engine.add_argument("--record", type=Path, required=True)
    report = commands.add_parser("collect", help="write results.json and results.md")
    report.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        forwarded = args.pretrain_args[1:] if args.pretrain_args[:1] == ["--"] else args.pretrain_args
        return run_pretrain(args.record, forwarded)
    if args.command == "hf":
        backends = [b for b in args.lxtrain_backends.split(",") if b]
        run_hf(args.shards, args.batch, args.steps, args.warmup, args.record, backends)
        return 0
    if args.command == "engine":
        run_engine(
            args.shards,
            args.deepspeed_config,
            args.batch,
            args.steps,
            args.warmup,
            args.record,
            args.zero_stage,
        )
        return 0
    if args.command == "loader":
        run_loader(args.shards, args.batch, args.workers, args.batches, args.record)
        return 0
    collect(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
