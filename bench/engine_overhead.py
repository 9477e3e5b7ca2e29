"""DeepSpeed's per-step overhead against a plain torch AdamW step on the same model, one process.

    python bench/engine_overhead.py --sizes tiny small --steps 20 --out engine_overhead.json

Every variant trains its own copy of the same model (lxtrain's ``LxmertForPretraining`` under
``PretrainingObjective``, same seed, so the same initial weights) on the same synthetic batch
(``bench/model_step.py``'s pre-training shapes), with every pre-training task on:

- ``plain``: forward + backward + ``clip_grad_norm_(foreach=True)`` + ``torch.optim.AdamW``
  (fused where this torch has it for the device, else foreach) + ``zero_grad(set_to_none=True)``;
- ``zeroN-old``: the DeepSpeed engine at ZeRO stage N, built as lxtrain/pretrain.py builds it,
  with the settings lxtrain ran with before docs/engine.md (DeepSpeed's own defaults for the
  throughput timer and the buckets; ``overlap_comm`` and ``contiguous_gradients`` on, as the
  shipped GPU configs had them), written into the JSON explicitly;
- ``zeroN-tuned``: the same JSON without those keys, completed by
  ``lxtrain.engine.prepare_deepspeed_config`` (the defaults every run now gets);
- ``zero1-fp32grads`` (bf16 only): ``zero1-tuned`` with ``data_types.grad_accum_dtype: fp32``,
  which makes DeepSpeed use its BF16_Optimizer.

Engine steps are ``engine(batch) / engine.backward / engine.step``, as in lxtrain/pretrain.py. One
rank: world size 1, gloo through a FileStore in a temporary directory (nccl and the first GPU
where there is one: a path not yet run on a GPU). Steps of the variants alternate (the order
rotates every round) so that a shared machine's noise hits them alike; the totals over the timed
steps after warm-up are reported, wall and CPU time of this process.

After timing, one more step per variant runs under a ``TorchDispatchMode`` that counts aten ops,
those of them that are not views or metadata (a proxy for kernel launches on a GPU), and the
host-syncing ones (``aten._local_scalar_dense``, ``aten.nonzero``, ``aten.is_nonzero``,
``aten.item``), each attributed to the innermost Python frame outside torch: DeepSpeed's code,
lxtrain's model, autograd's engine (the model's backward kernels) or other (this bench's plain
step). DeepSpeed's ``accelerator.synchronize()`` calls (no aten op; a no-op on CPU, a device-wide
sync on a GPU) are counted by wrapping it. DeepSpeed's own fused Adam is a C++ extension call, not
an aten op, so it is not in the counts (torch's fused AdamW is one ``aten._fused_adamw_``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install
sys.path.insert(0, str(REPO / "bench"))

from model_step import synthetic_batch  # noqa: E402

from lxtrain import engine as engine_setup  # noqa: E402
from lxtrain.config import MODEL_PRESETS, PretrainConfig  # noqa: E402
from lxtrain.model.lxmert import LxmertForPretraining  # noqa: E402
from lxtrain.tasks.objectives import (  # noqa: E402
    HF_VISUAL_LOSS_NORMALIZER,
    RELEASE_VISUAL_LOSS_NORMALIZER,
    TASKS,
    PretrainingObjective,
)

SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item")
# Ops that only make or re-point tensor metadata or allocate: no kernel on a GPU (views are
# recognised by their schema, OpOverload.is_view).
NO_KERNEL_OPS = ("set_", "lift_fresh", "empty", "empty_like", "empty_strided", "_unsafe_view")
FEATURE_DIM, NUM_ANSWERS = 2048, 9500  # LXMERT's detector features and QA answer set
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
LXTRAIN_DIR = str(REPO / "lxtrain")

# What lxtrain ran with before the tuned defaults, spelled out so that prepare_deepspeed_config's
# setdefaults leave it alone: DeepSpeed 0.19.8's defaults (deepspeed/utils/config.py,
# deepspeed/runtime/zero/config.py, runtime/precision_config.py) and the shipped GPU configs' ZeRO keys.
OLD_SETTINGS: dict[str, Any] = {
    "timers": {"throughput": {"enabled": True, "synchronized": True}},
    "zero_optimization": {
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
    },
}


def base_deepspeed_json(stage: int, batch: int, precision: str) -> dict[str, Any]:
    """ds_configs/zero2_bf16.json's optimiser, schedule and clipping, one rank, no accumulation."""
    config: dict[str, Any] = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": 1e-4,
                "betas": [0.9, 0.999],
                "eps": 1e-6,
                "weight_decay": 0.01,
                "bias_correction": False,
                "adam_w_mode": True,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
                "total_num_steps": "auto",
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": stage},
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def old_deepspeed_json(stage: int, batch: int, precision: str) -> dict[str, Any]:
    config = base_deepspeed_json(stage, batch, precision)
    config["timers"] = json.loads(json.dumps(OLD_SETTINGS["timers"]))
    if stage > 0:
        config["zero_optimization"].update(OLD_SETTINGS["zero_optimization"])
    if precision == "bf16":
        config["bf16"]["check_grad_overflow"] = True  # DeepSpeed 0.19.8's default
    return config


def bench_device() -> torch.device:
    """The first CUDA GPU when there is one (DeepSpeed picks it too), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def synchronize_device() -> None:
    """Wait for queued kernels before reading a clock (nothing to wait for on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def init_single_rank(workdir: Path) -> None:
    """World size 1 (gloo on CPU, nccl on a GPU); DeepSpeed adopts the initialised process group."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")  # not used: the FileStore meets the one rank
    if not dist.is_initialized():
        store = dist.FileStore(str(workdir / "store"), 1)
        backend = "nccl" if bench_device().type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=1)


def pretrain_config(size: str, ds_json: Path, workdir: Path) -> PretrainConfig:
    return PretrainConfig(
        deepspeed_config=str(ds_json),
        train_shards=str(workdir / "no-shards"),
        output_dir=str(workdir / "run"),
        model=size,
    )


def build_objective(cfg: PretrainConfig) -> PretrainingObjective:
    """The module lxtrain/pretrain.py ``build_engine`` hands DeepSpeed for ``cfg`` (same seed, model,
    visual-loss normaliser), eager. Built here from the same library pieces rather than through
    ``build_engine`` so that the plain variant trains the very same module without an engine."""
    model_config = cfg.model_config(feature_dim=FEATURE_DIM, num_answers=NUM_ANSWERS)
    torch.manual_seed(cfg.seed)
    model = LxmertForPretraining(model_config)
    normalizer = (
        HF_VISUAL_LOSS_NORMALIZER if cfg.visual_loss_normalizer == "hf" else RELEASE_VISUAL_LOSS_NORMALIZER
    )
    return PretrainingObjective(model, normalizer, zero_visual_input=cfg.zero_visual_input).train()


def build_plain(cfg: PretrainConfig, precision: str, batch: dict, weights: dict) -> Callable[[], None]:
    device = bench_device()
    objective = build_objective(cfg).to(device)
    device_batch = {key: value.to(device) for key, value in batch.items()}
    params = [p for p in objective.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01, fused=True)
        optimizer_kind = "fused"
    except (RuntimeError, ValueError):  # no fused kernel for this device in this torch
        optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01, foreach=True)
        optimizer_kind = "foreach"
    autocast = precision == "bf16"

    def step() -> None:
        # bf16: torch's own mixed precision (fp32 weights, bf16 compute), the plain counterpart
        # of DeepSpeed's bf16 weights with fp32 master copies.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = objective(device_batch, weights).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer_kind = optimizer_kind  # type: ignore[attr-defined]
    return step


def build_deepspeed(cfg: PretrainConfig, batch: dict, weights: dict) -> tuple[Callable[[], None], Any]:
    """An engine as lxtrain/pretrain.py builds one (config completed by prepare_deepspeed_config,
    engine by lxtrain.engine.initialize), and one training step of it as pretrain.py runs it."""
    objective = build_objective(cfg)
    ds_config = engine_setup.prepare_deepspeed_config(
        cfg.deepspeed_config,
        world_size=1,
        total_steps=10**6,
        warmup_fraction=cfg.warmup_fraction,
        num_parameters=sum(p.numel() for p in objective.parameters() if p.requires_grad),
    )
    engine = engine_setup.initialize(objective, ds_config)
    engine.train()
    device_batch = {key: value.to(engine.device) for key, value in batch.items()}

    def step() -> None:
        output = engine(device_batch, weights)
        engine.backward(output.total)
        engine.step()

    step.config = ds_config  # type: ignore[attr-defined]
    return step, engine


class OpCounter(TorchDispatchMode):
    """Counts aten ops by the innermost Python frame outside torch that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()

    @staticmethod
    def origin() -> tuple[str, str]:
        frame = sys._getframe(2)  # 0: origin, 1: __torch_dispatch__
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(TORCH_DIR):
                if frame.f_code.co_name == "_engine_run_backward":
                    # Reached autograd's entry without a Python hook in between: the op is one
                    # of the model's backward kernels, run by the C++ engine.
                    return "autograd", f"{filename}:{frame.f_lineno}"
                frame = frame.f_back
                continue
            short = filename.rsplit("site-packages/", 1)[-1].removeprefix(str(REPO) + "/")
            site = f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
            if "/deepspeed/" in filename:
                return "deepspeed", site
            if filename.startswith(LXTRAIN_DIR):
                return "lxtrain", site
            return "other", site
        return "other", "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch signature)
        where, site = self.origin()
        self.ops[where] += 1
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in NO_KERNEL_OPS:
            self.kernels[where] += 1
        if name in SYNC_OPS:
            self.syncs[where] += 1
            self.sync_sites[f"{func.__name__} at {site}"] += 1
        return func(*args, **(kwargs or {}))


class SynchronizeCounter:
    """Counts DeepSpeed's ``get_accelerator().synchronize()`` calls (wrapped on the singleton)."""

    def __init__(self) -> None:
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        self.original = self.accelerator.synchronize
        self.calls = 0

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.original(*args, **kwargs)

        self.accelerator.synchronize = counting


def count_one_step(step: Callable[[], None], synchronize: SynchronizeCounter) -> dict[str, Any]:
    counter = OpCounter()
    before = synchronize.calls
    with counter:
        step()
    syncs_ds = counter.syncs["deepspeed"]
    return {
        "aten_ops": sum(counter.ops.values()),
        "aten_ops_by_origin": dict(counter.ops),
        "kernel_ops": sum(counter.kernels.values()),
        "kernel_ops_by_origin": dict(counter.kernels),
        "host_syncs_deepspeed": syncs_ds,
        "host_syncs_elsewhere": sum(counter.syncs.values()) - syncs_ds,
        "host_sync_sites": dict(counter.sync_sites.most_common(8)),
        "accelerator_synchronize": synchronize.calls - before,
    }


def run_size(size: str, args: argparse.Namespace, workdir: Path, synchronize: SynchronizeCounter) -> dict:
    base_cfg = pretrain_config(
        size, write_json(workdir / "probe.json", base_deepspeed_json(0, 1, "fp32")), workdir
    )
    model_config = base_cfg.model_config(feature_dim=FEATURE_DIM, num_answers=NUM_ANSWERS)
    batch = synthetic_batch(model_config, args.batch)
    weights = dict.fromkeys(TASKS, 1.0)

    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    plain = build_plain(base_cfg, args.precision, batch, weights)
    steps["plain"] = plain
    info["plain"] = {"optimizer": f"torch.optim.AdamW ({plain.optimizer_kind})"}  # type: ignore[attr-defined]
    configs: dict[str, dict[str, Any]] = {}
    for stage in args.stages:
        configs[f"zero{stage}-old"] = old_deepspeed_json(stage, args.batch, args.precision)
        configs[f"zero{stage}-tuned"] = base_deepspeed_json(stage, args.batch, args.precision)
    if args.precision == "bf16" and 1 in args.stages:
        # ZeRO-1 with fp32 gradient accumulation: DeepSpeed takes its BF16_Optimizer instead of the
        # ZeRO-1/2 optimiser (engine.py _do_optimizer_sanity_check), docs/engine.md.
        configs["zero1-fp32grads"] = base_deepspeed_json(1, args.batch, args.precision)
        configs["zero1-fp32grads"]["data_types"] = {"grad_accum_dtype": "fp32"}
    for name, ds_json in configs.items():
        path = write_json(workdir / f"{size}-{name}.json", ds_json)
        step, engine = build_deepspeed(pretrain_config(size, path, workdir), batch, weights)
        steps[name] = step
        config = step.config  # type: ignore[attr-defined]
        info[name] = {
            "optimizer": type(engine.optimizer).__name__,
            "deepspeed_settings": {
                key: config.get(key) for key in ("timers", "zero_optimization", "bf16", "data_types")
            },
            "skips_nonfinite_steps": engine_setup.skips_nonfinite_steps(config),
        }

    names = list(steps)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize_device()
            if round_ >= args.warmup:
                wall[name] += time.perf_counter() - wall_start
                cpu[name] += time.process_time() - cpu_start

    results: dict[str, Any] = {}
    for name in names:
        counts = count_one_step(steps[name], synchronize)
        results[name] = {
            **info[name],
            "total_wall_s": wall[name],
            "total_cpu_s": cpu[name],
            "step_wall_ms": 1e3 * wall[name] / args.steps,
            "step_cpu_ms": 1e3 * cpu[name] / args.steps,
            "wall_ratio_to_plain": wall[name] / wall["plain"],
            "cpu_ratio_to_plain": cpu[name] / cpu["plain"],
            **counts,
        }
    counted = [p.numel() for p in LxmertForPretraining(model_config).parameters() if p.requires_grad]
    return {"parameters": sum(counted), "parameter_tensors": len(counted), "variants": results}


def write_json(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=2))
    return path


def print_table(size: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{size}: {result['parameters'] / 1e6:.1f}M parameters in {result['parameter_tensors']} tensors, "
        f"batch {args.batch}, {args.precision}, {args.steps} timed steps after {args.warmup} warm-up"
    )
    header = (
        f"{'variant':13s} {'total s':>8s} {'ms/step':>8s} {'ratio':>6s} {'CPU ms':>8s} {'ratio':>6s} "
        f"{'aten ops':>8s} {'by DS':>6s} {'kernels':>7s} {'by DS':>6s} {'syncs DS':>8s} {'other':>5s} "
        f"{'acc.sync':>8s}"
    )
    print(header)
    print("-" * len(header))
    for name, row in result["variants"].items():
        print(
            f"{name:13s} {row['total_wall_s']:8.2f} {row['step_wall_ms']:8.1f} "
            f"{row['wall_ratio_to_plain']:6.2f} {row['step_cpu_ms']:8.1f} {row['cpu_ratio_to_plain']:6.2f} "
            f"{row['aten_ops']:8d} {row['aten_ops_by_origin'].get('deepspeed', 0):6d} "
            f"{row['kernel_ops']:7d} {row['kernel_ops_by_origin'].get('deepspeed', 0):6d} "
            f"{row['host_syncs_deepspeed']:8d} {row['host_syncs_elsewhere']:5d} {row['accelerator_synchronize']:8d}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=MODEL_PRESETS, default=["tiny", "small"])
    parser.add_argument("--stages", nargs="+", type=int, choices=(0, 1, 2), default=[0, 1, 2])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared machine)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="engine_overhead_") as tmp:
        workdir = Path(tmp)
        init_single_rank(workdir)
        import deepspeed

        # DeepSpeed logs every engine's configuration at INFO; the table is the output here.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        synchronize = SynchronizeCounter()
        report: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "machine": platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "precision": args.precision,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "sizes": {},
        }
        for size in args.sizes:
            report["sizes"][size] = run_size(size, args, workdir, synchronize)
            print_table(size, report["sizes"][size], args)
        dist.destroy_process_group()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
