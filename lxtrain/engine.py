"""DeepSpeed set-up: the JSON checked and completed before any compute, then the engine.

The DeepSpeed JSON owns batch sizes, precision, ZeRO stage, optimiser and LR schedule. lxtrain
fills the values that depend on the data ("auto": gradient accumulation from the world size,
total and warm-up steps from the shard index and the epochs) and refuses inconsistent settings
with a message that names the file, the key and the fix.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"


class ConfigError(ValueError):
    """An inconsistent or unsupported DeepSpeed configuration."""


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found (see ds_configs/ for ready ones)") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def resolve_batch_sizes(config: dict[str, Any], world_size: int, source: str) -> tuple[int, int, int]:
    """Fill "auto" batch keys and check train_batch_size == micro x accumulation x world size."""
    global_batch = config.get("train_batch_size", AUTO)
    micro = config.get("train_micro_batch_size_per_gpu", AUTO)
    accumulation = config.get("gradient_accumulation_steps", AUTO)
    if micro == AUTO:
        if global_batch == AUTO or accumulation == AUTO:
            raise ConfigError(f"{source}: set train_micro_batch_size_per_gpu (and train_batch_size)")
        micro = global_batch // (accumulation * world_size)
    if accumulation == AUTO:
        if global_batch == AUTO:
            accumulation = 1
        elif global_batch % (micro * world_size):
            raise ConfigError(
                f"{source}: train_batch_size {global_batch} is not a multiple of "
                f"train_micro_batch_size_per_gpu {micro} x {world_size} ranks; change train_batch_size "
                f"or the micro batch, or run on a world size that divides it"
            )
        else:
            accumulation = global_batch // (micro * world_size)
    if global_batch == AUTO:
        global_batch = micro * accumulation * world_size
    if micro * accumulation * world_size != global_batch or min(micro, accumulation, global_batch) <= 0:
        raise ConfigError(
            f"{source}: inconsistent batch sizes: train_batch_size {global_batch} != "
            f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {accumulation} x "
            f'world size {world_size}; set gradient_accumulation_steps to "auto" to derive it'
        )
    config["train_batch_size"] = global_batch
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    return global_batch, micro, accumulation


def precision(config: dict[str, Any]) -> str:
    fp16 = config.get("fp16", {}).get("enabled", False)
    bf16 = config.get("bf16", {}).get("enabled", False)
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def prepare_deepspeed_config(
    path: str | Path,
    *,
    world_size: int,
    total_steps: int,
    warmup_fraction: float,
    cuda_available: bool | None = None,
) -> dict[str, Any]:
    """Load, check and complete a DeepSpeed JSON for this run (nothing is computed before this passes)."""
    source = str(path)
    config = copy.deepcopy(load_deepspeed_config(path))
    resolve_batch_sizes(config, world_size, source)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available

    if precision(config) == "fp16" and not cuda:
        raise ConfigError(
            f"{source}: fp16.enabled is true but there is no CUDA GPU; fp16 with loss scaling is a GPU "
            'feature. Use bf16 ("bf16": {"enabled": true}) or fp32 on CPU, e.g. ds_configs/cpu_tiny.json'
        )
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{source}: fp16 and bf16 are both enabled; enable one")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3; got {stage}")

    optimizer = config.get("optimizer")
    if optimizer is None:
        raise ConfigError(f'{source}: no "optimizer" section; copy one from ds_configs/zero2_bf16.json')
    params = optimizer.setdefault("params", {})
    if optimizer.get("type", "").lower() in ("adam", "adamw") and params.get("bias_correction", True):
        # Not an error (users may want standard Adam), but the reference optimiser has none.
        print(f"note: {source}: optimizer.params.bias_correction is true; LXMERT's BertAdam uses false")

    scheduler = config.get("scheduler")
    if scheduler is not None:
        sched_params = scheduler.setdefault("params", {})
        if sched_params.get("total_num_steps") == AUTO:
            sched_params["total_num_steps"] = total_steps
        if sched_params.get("warmup_num_steps") == AUTO:
            sched_params["warmup_num_steps"] = max(1, math.ceil(warmup_fraction * total_steps))
        if sched_params.get("warmup_max_lr") == AUTO:
            sched_params["warmup_max_lr"] = params.get("lr", 1e-4)
        left = [key for key, value in sched_params.items() if value == AUTO]
        if left:
            raise ConfigError(f'{source}: scheduler.params {left} are "auto" but lxtrain cannot derive them')
    # lxtrain prints its own progress line; DeepSpeed's per-step prints would interleave with it.
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def initialize(model: torch.nn.Module, config: dict[str, Any]):
    """DeepSpeed engine over ``model`` with one parameter group (decay applies to all, as in BertAdam)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    return engine


def loss_scale(engine) -> float:
    """Current fp16 loss scale (1.0 without dynamic loss scaling)."""
    optimizer = getattr(engine, "optimizer", None)
    for attribute in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attribute, None)
        if isinstance(value, int | float):
            return float(value)
    return 1.0
