"""DeepSpeed JSON checks: inconsistent settings are refused before any compute."""

import json
from pathlib import Path

import pytest

from lxtrain.engine import ConfigError, prepare_deepspeed_config, resolve_batch_sizes


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
