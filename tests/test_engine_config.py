"""DeepSpeed JSON checks: inconsistent settings are refused before any compute; the per-step
overhead defaults are filled in where the JSON is silent; DeepSpeed skips a step with a NaN gradient."""

import json
from pathlib import Path

import pytest
import torch

from lxtrain.engine import (
    DEFAULT_REDUCE_BUCKET_ELEMENTS,
    ConfigError,
    initialize,
    prepare_deepspeed_config,
    reduce_bucket_elements,
    resolve_batch_sizes,
    skips_nonfinite_steps,
)
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks.objectives import TASKS, PretrainingObjective


def write(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def test_shipped_gpu_configs_follow_the_reference_optimiser():
    config = prepare_deepspeed_config(
        "ds_configs/zero2_bf16.json",
        world_size=4,
        total_steps=1000,
        warmup_fraction=0.05,
        cuda_available=True,
    )
    assert config["train_batch_size"] == 256 and config["gradient_accumulation_steps"] == 2
    params = config["optimizer"]["params"]
    assert params["eps"] == 1e-6 and params["bias_correction"] is False and params["weight_decay"] == 0.01
    assert params["adam_w_mode"] is True and params["lr"] == 1e-4
    scheduler = config["scheduler"]["params"]
    assert scheduler["total_num_steps"] == 1000 and scheduler["warmup_num_steps"] == 50
    assert scheduler["warmup_max_lr"] == 1e-4 and scheduler["warmup_type"] == "linear"
    assert config["gradient_clipping"] == 1.0


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_every_gpu_config_has_bf16_and_fp16_variants(name):
    for precision in ("bf16", "fp16"):
        config = json.loads(Path(f"ds_configs/{name}_{precision}.json").read_text())
        assert config[precision]["enabled"] is True
        assert config["zero_optimization"]["stage"] == int(name[-1])


def test_fp16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="fp16.*no CUDA GPU.*bf16"):
        prepare_deepspeed_config(
            "ds_configs/zero2_fp16.json",
            world_size=1,
            total_steps=10,
            warmup_fraction=0.05,
            cuda_available=False,
        )


def test_inconsistent_batch_sizes_name_the_keys(tmp_path):
    path = write(
        tmp_path,
        {
            "train_batch_size": 100,
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "Adam"},
        },
    )
    with pytest.raises(ConfigError, match=r"train_batch_size 100 != train_micro_batch_size_per_gpu 8"):
        prepare_deepspeed_config(
            path, world_size=2, total_steps=10, warmup_fraction=0.05, cuda_available=False
        )


def test_global_batch_not_divisible_by_world(tmp_path):
    config = {
        "train_batch_size": 256,
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": "auto",
    }
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_batch_sizes(config, world_size=3, source="x.json")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        prepare_deepspeed_config(tmp_path / "nope.json", world_size=1, total_steps=1, warmup_fraction=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        prepare_deepspeed_config(bad, world_size=1, total_steps=1, warmup_fraction=0)


# --- Per-step-overhead defaults (docs/engine.md) ------------------------------------------------

BASE_MODEL_PARAMETERS = 228_051_752  # LXMERT-base as lxtrain builds it


def prepare(path, world_size: int, **kwargs):
    return prepare_deepspeed_config(
        path, world_size=world_size, total_steps=100, warmup_fraction=0.1, cuda_available=True, **kwargs
    )


def test_one_rank_gets_no_timer_no_overlap_and_no_gradient_copies():
    config = prepare("ds_configs/cpu_tiny.json", world_size=1)
    assert config["timers"]["throughput"]["enabled"] is False
    assert config["wall_clock_breakdown"] is False
    zero = config["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is False
    # One bucket (DeepSpeed's own 5e8 elements) on one rank: nothing to overlap.
    assert "reduce_bucket_size" not in zero


def test_several_ranks_overlap_reduction_in_a_few_buckets_per_model():
    config = prepare("ds_configs/zero2_bf16.json", world_size=4, num_parameters=BASE_MODEL_PARAMETERS)
    zero = config["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    bucket = zero["reduce_bucket_size"]
    assert bucket % 2**20 == 0
    assert 3 <= BASE_MODEL_PARAMETERS / bucket <= 4  # four buckets, the last one partly filled
    assert config["bf16"]["check_grad_overflow"] is True
    assert "allgather_bucket_size" not in zero
    # Without the model size: the fixed fallback, about a quarter of LXMERT-base.
    unsized = prepare("ds_configs/zero2_bf16.json", world_size=4)["zero_optimization"]
    assert unsized["reduce_bucket_size"] == DEFAULT_REDUCE_BUCKET_ELEMENTS


def test_stage_0_and_3_get_only_the_timer_default():
    for name in ("cpu_zero3.json", "zero3_bf16.json"):
        config = prepare(f"ds_configs/{name}", world_size=2)
        assert config["timers"]["throughput"]["enabled"] is False
        assert "reduce_bucket_size" not in config["zero_optimization"]
    config = prepare("ds_configs/zero3_bf16.json", world_size=2)
    assert config["zero_optimization"].get("overlap_comm", True) is True  # DeepSpeed's stage-3 default


def test_explicit_values_in_the_json_win(tmp_path):
    config = json.loads(Path("ds_configs/zero2_bf16.json").read_text())
    config["timers"] = {"throughput": {"enabled": True, "synchronized": False}}
    config["wall_clock_breakdown"] = True
    config["zero_optimization"].update(
        overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=123_456_789
    )
    config["bf16"]["check_grad_overflow"] = False
    completed = prepare(write(tmp_path, config), world_size=1)
    assert completed["timers"]["throughput"] == {"enabled": True, "synchronized": False}
    assert completed["wall_clock_breakdown"] is True
    zero = completed["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 123_456_789
    assert completed["bf16"]["check_grad_overflow"] is False
    # And the other way round: overlap switched off by hand on several ranks keeps the copies off.
    config["zero_optimization"] = {"stage": 2, "overlap_comm": False}
    zero = prepare(write(tmp_path, config), world_size=8)["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is False


def test_reduce_bucket_elements():
    assert reduce_bucket_elements(1, BASE_MODEL_PARAMETERS) is None
    assert reduce_bucket_elements(2, None) == DEFAULT_REDUCE_BUCKET_ELEMENTS
    assert reduce_bucket_elements(2, 1000) == 2**20  # never below 1M elements
    assert reduce_bucket_elements(8, 40 * 2**20) == 10 * 2**20


@pytest.mark.parametrize(
    ("stage", "section", "expected"),
    [
        # docs/engine.md, "Which steps DeepSpeed skips": each row seen on CPU with a NaN gradient.
        (0, {}, False),
        (0, {"bf16": {"enabled": True}}, True),
        (0, {"fp16": {"enabled": True}}, True),
        (1, {}, True),
        (1, {"zero_optimization": {"compute_grad_norm": False}, "gradient_clipping": 0.0}, False),
        (1, {"bf16": {"enabled": True, "check_grad_overflow": True}}, True),
        (1, {"bf16": {"enabled": True, "check_grad_overflow": False}}, False),
        (
            1,
            {
                "bf16": {"enabled": True, "check_grad_overflow": False},
                "data_types": {"grad_accum_dtype": "fp32"},
            },
            True,
        ),
        (2, {}, True),
        (2, {"bf16": {"enabled": True}}, True),  # DeepSpeed's default: check_grad_overflow on
        (2, {"bf16": {"enabled": True, "check_grad_overflow": False}}, False),
        (2, {"bfloat16": {"enabled": True, "check_grad_overflow": False}}, False),
        (2, {"fp16": {"enabled": True}}, True),
        (3, {}, True),
        (3, {"bf16": {"enabled": True, "check_grad_overflow": False}}, True),
    ],
)
def test_skips_nonfinite_steps_follows_the_table(stage, section, expected):
    config = {"zero_optimization": {"stage": stage}}
    for key, value in section.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    assert skips_nonfinite_steps(config) is expected


def test_every_shipped_config_skips_nonfinite_steps_once_completed():
    for path in sorted(Path("ds_configs").glob("*.json")):
        config = prepare(path, world_size=2)
        stage = config["zero_optimization"]["stage"]
        assert skips_nonfinite_steps(config) is True, f"{path}: ZeRO-{stage} would apply a NaN step"


@pytest.fixture
def single_rank(tmp_path, monkeypatch):
    """A one-rank gloo process group (world size 1) for an in-process DeepSpeed engine."""
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29647")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
        )
    yield
    if created:
        from deepspeed.comm import comm as deepspeed_comm

        if deepspeed_comm.cdb is not None and dist.is_initialized():
            # Through DeepSpeed, which also forgets the groups it cached (the next engine in this
            # process would use them otherwise).
            deepspeed_comm.destroy_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()


def parameters_of(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_skips_a_step_with_a_nan_gradient(tmp_path, single_rank, make_batch, precision):
    """ZeRO-2 with the completed default config: one NaN in one gradient drops the whole update."""
    config = json.loads(Path("ds_configs/cpu_tiny.json").read_text())
    config.update(train_batch_size=4, train_micro_batch_size_per_gpu=4)
    # Warm-up from a non-zero LR, so that the first step moves the weights too.
    config["scheduler"]["params"]["warmup_min_lr"] = 1e-4
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    completed = prepare_deepspeed_config(
        write(tmp_path, config), world_size=1, total_steps=100, warmup_fraction=0.1, cuda_available=False
    )
    assert skips_nonfinite_steps(completed)

    model_config = LxmertConfig.tiny()
    torch.manual_seed(0)
    model = LxmertForPretraining(model_config)
    engine = initialize(PretrainingObjective(model), completed)
    batch, weights = make_batch(model_config), dict.fromkeys(TASKS, 1.0)

    def train_step(nan_in=None) -> None:
        output = engine(batch, weights)
        hook = None
        if nan_in is not None:
            # One element of one weight's gradient, as an overflow in one layer would make it.
            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad

            hook = nan_in.register_hook(poison)
        engine.backward(output.total)
        if hook is not None:
            hook.remove()
        engine.step()

    # A healthy step first: it changes the weights (so the comparison below can fail) and creates
    # the optimiser state that a skipped step must also leave alone.
    start = parameters_of(engine)
    train_step()
    after_good = parameters_of(engine)
    assert engine.skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(start, after_good, strict=True))
    lr = engine.get_lr()

    train_step(nan_in=model.backbone.pooler.weight)
    assert engine.skipped_steps == 1
    names = [name for name, _ in engine.module.named_parameters()]
    for name, before, now in zip(names, after_good, parameters_of(engine), strict=True):
        assert torch.equal(before, now), f"{name} changed in a skipped step"
    assert engine.get_lr() == lr  # the LR schedule does not advance either

    # The engine recovers: the next healthy step applies, and every weight stays finite.
    train_step()
    assert engine.skipped_steps == 1
    final = parameters_of(engine)
    assert all(torch.isfinite(p).all() for p in final)
    assert any(not torch.equal(a, b) for a, b in zip(after_good, final, strict=True))
