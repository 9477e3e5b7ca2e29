"""DeepSpeed set-up: the JSON checked and completed before any compute, then the engine.

The DeepSpeed JSON owns batch sizes, precision, ZeRO stage, optimiser and LR schedule. lxtrain
fills the values that depend on the data ("auto": gradient accumulation from the world size,
total and warm-up steps from the shard index and the epochs) and refuses inconsistent settings
with a message that names the file, the key and the fix.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"

logger = logging.getLogger(__name__)


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


def check_deepspeed_config(config: dict[str, Any], source: str, cuda_available: bool | None = None) -> None:
    """Refuse what cannot run here (precision without the hardware, an unknown ZeRO stage, no
    optimiser), naming the file and the fix; cheap, so entry points call it before reading data."""
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
    if config.get("optimizer") is None:
        raise ConfigError(f'{source}: no "optimizer" section; copy one from ds_configs/zero2_bf16.json')


def prepare_deepspeed_config(
    path: str | Path,
    *,
    world_size: int,
    total_steps: int,
    warmup_fraction: float,
    cuda_available: bool | None = None,
    num_parameters: int | None = None,
) -> dict[str, Any]:
    """Load, check and complete a DeepSpeed JSON for this run (nothing is computed before this passes).

    ``num_parameters`` (the model's trainable parameter count, when known) sizes the ZeRO-1/2
    reduction buckets on several ranks; see ``complete_engine_settings``.
    """
    source = str(path)
    config = copy.deepcopy(load_deepspeed_config(path))
    resolve_batch_sizes(config, world_size, source)
    check_deepspeed_config(config, source, cuda_available)
    optimizer = config["optimizer"]
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
    complete_engine_settings(config, world_size=world_size, num_parameters=num_parameters)
    return config


# Elements per ZeRO-1/2 gradient-reduction bucket on several ranks when the model size is not
# known: about a quarter of LXMERT-base (228M), so reductions start during backward.
DEFAULT_REDUCE_BUCKET_ELEMENTS = 50_000_000
# Reduction buckets per model when its size is known (a few: overlap without many tiny collectives).
REDUCE_BUCKETS_PER_MODEL = 4


def reduce_bucket_elements(world_size: int, num_parameters: int | None) -> int | None:
    """The ``reduce_bucket_size`` lxtrain fills in, or None to keep DeepSpeed's (5e8 elements).

    One rank has nothing to overlap: one bucket (DeepSpeed's default, larger than every lxtrain
    model) is the fewest collectives and Python passes. Several ranks: a few buckets per model,
    so the first reductions run while backward is still computing the earlier layers.
    """
    if world_size <= 1:
        return None
    if num_parameters is None:
        return DEFAULT_REDUCE_BUCKET_ELEMENTS
    # Rounded up to a multiple of 2**20 (alignment for the NCCL partition offsets, and a bucket
    # never smaller than 1M elements, where per-collective latency would dominate).
    per_bucket = math.ceil(num_parameters / REDUCE_BUCKETS_PER_MODEL)
    return max(1, math.ceil(per_bucket / 2**20)) * 2**20


def complete_engine_settings(
    config: dict[str, Any], *, world_size: int, num_parameters: int | None = None
) -> None:
    """Fill the per-step-overhead settings this project chose (docs/engine.md) where the JSON is silent.

    Every value is a ``setdefault``: a key the user wrote wins.
    """
    config.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on and device-synchronising by default (two
    # accelerator.synchronize() per step, in the forward pre-hook and in engine.step()), and
    # ``wall_clock_breakdown: false`` does not turn it off. lxtrain measures samples/s itself.
    throughput = config.setdefault("timers", {}).setdefault("throughput", {})
    throughput.setdefault("enabled", False)

    zero = config.get("zero_optimization")
    stage = zero.get("stage", 0) if zero else 0
    if stage in (1, 2):
        # overlap_comm reduces on a side stream during backward. It costs a device-wide
        # synchronize() after every backward (stage_1_and_2.py independent_gradient_partition_epilogue),
        # which one rank pays for nothing: it has nothing to reduce.
        overlap = zero.setdefault("overlap_comm", world_size > 1)
        # contiguous_gradients copies each gradient into the reduction bucket as it arrives and
        # again into the rank's partition (measured on one rank: a third of the aten ops DeepSpeed
        # itself issues per step, bench/engine_overhead.py). Overlapping needs it: without it every bucket's reduction under overlap_comm starts
        # with a device-wide synchronize() (stage_1_and_2.py allreduce_and_copy).
        zero.setdefault("contiguous_gradients", bool(overlap))
        bucket = reduce_bucket_elements(world_size, num_parameters)
        if bucket is not None:
            zero.setdefault("reduce_bucket_size", bucket)
        # allgather_bucket_size (the updated partitions gathered after the optimiser step) stays
        # DeepSpeed's 5e8: that gather overlaps nothing, so fewer, larger collectives are best.
    bf16 = _bf16_section(config)
    if bf16 is not None and bf16.get("enabled", False):
        # ZeRO-1/2 in bf16 skip a step with a non-finite gradient only while this is true
        # (stage_1_and_2.py step(): ``(dtype != bf16 or check_grad_overflow) and
        # is_invalid_grad_norm``), and lxtrain relies on that skip. DeepSpeed 0.19.8 defaults it to
        # true; pinned so that the skip does not hang on an installed release's default.
        bf16.setdefault("check_grad_overflow", True)


def _bf16_section(config: dict[str, Any]) -> dict[str, Any] | None:
    """The bf16 section as DeepSpeed reads it: ``bf16``, else the older spelling ``bfloat16``."""
    section = config.get("bf16", config.get("bfloat16"))
    return section if isinstance(section, dict) else None


def skips_nonfinite_steps(config: dict[str, Any]) -> bool:
    """Whether DeepSpeed 0.19.8, given this completed config, skips an optimiser step whose
    gradients hold a NaN or an infinity (parameters, optimiser state and LR schedule unchanged,
    ``engine.skipped_steps`` + 1).

    Where it does, a NaN loss needs no host read of lxtrain's own between forward and backward:
    its gradients are NaN and DeepSpeed drops the update. The table with the deciding source
    lines, each seen on CPU with a NaN gradient, is in docs/engine.md.
    """
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    bf16 = _bf16_section(config) or {}
    mode = precision(config)
    if mode == "fp32" and bf16.get("enabled", False):
        mode = "bf16"  # spelled "bfloat16"
    if mode == "fp16":
        # Loss scaling: every fp16 optimiser checks for overflow (engine.py forces
        # check_grad_overflow=True for fp16).
        return True
    if stage == 3:
        # stage3.py step(): an invalid global norm always sets overflow, whatever the dtype.
        return True
    if stage == 0:
        # fp32: the bare optimiser has no ``overflow`` flag, so engine._take_model_step never
        # skips. bf16: FP16_Optimizer (DDP_BFLOAT16) checks every gradient and the norm.
        return mode == "bf16"
    if mode == "bf16":
        accumulation_dtype = str((config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
        offload = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
        if stage == 1 and accumulation_dtype in ("fp32", "float32", "float", "torch.float32") and not offload:
            # DeepSpeed picks BF16_Optimizer here, which skips on an invalid norm unconditionally.
            return True
        return bool(bf16.get("check_grad_overflow", True))
    # fp32 ZeRO-1/2: the invalid-norm test runs (dtype != bf16) when the norm is computed at all.
    return bool(zero.get("compute_grad_norm", True))


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a ``zero_optimization`` section)."""
    return (config.get("zero_optimization") or {}).get("stage", 0)


def check_attention_backend(model: torch.nn.Module, config: dict[str, Any], source: str = "") -> None:
    """Refuse (or adapt) an attention backend that cannot run under the config's parallelism.

    DeepSpeed ZeRO-3 gathers a module's weights only inside that module's own forward, and the
    fused epilogues read the dense and LayerNorm weights from the parent block, where they are
    still empty partitions. So under ZeRO-3 ``fused`` is a ``ConfigError`` naming the flag and the
    fix, and ``auto`` keeps the epilogues on the exact path (attention itself is unaffected).
    ``source`` (the DeepSpeed JSON's path) opens the message when given.
    """
    from lxtrain.model import attention

    if zero_stage(config) != 3:
        return
    backend = attention.attention_backend_of(model)
    where = f"{source}: " if source else ""
    if backend == "fused":
        raise ConfigError(
            f"{where}attention backend 'fused' (--attention fused or {attention.ENV_OVERRIDE}=fused) cannot run "
            "under DeepSpeed ZeRO stage 3: its fused epilogues read weights that ZeRO-3 keeps partitioned "
            f"outside their own modules. Use --attention auto or sdpa (and unset {attention.ENV_OVERRIDE}), "
            "or a ZeRO stage 0-2 config such as ds_configs/zero2_bf16.json"
        )
    if backend == "auto":
        attention.keep_epilogues_exact(model)
        if attention.AUTO_USES_FUSED_KERNELS:
            logger.info("attention backend 'auto' under ZeRO-3: the layer epilogues stay on the exact path")


def initialize(model: torch.nn.Module, config: dict[str, Any]):
    """DeepSpeed engine over ``model`` with one parameter group (decay applies to all, as in BertAdam).

    The model's attention backend is checked against the parallelism first (``check_attention_backend``).
    """
    check_attention_backend(model, config)  # before importing DeepSpeed: a refusal costs nothing
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
