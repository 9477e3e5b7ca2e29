"""The attention backend is chosen once per model: --attention reaches the layers, LXTRAIN_ATTENTION
wins, no forward reads the environment, and the engine refuses 'fused' under ZeRO-3."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import pytest
import torch
from conftest import build_batch

from lxtrain import batch as B
from lxtrain import engine
from lxtrain.config import PretrainConfig
from lxtrain.config import parse_args as parse_pretrain_args
from lxtrain.downstream.config import FinetuneConfig
from lxtrain.downstream.config import parse_args as parse_finetune_args
from lxtrain.downstream.models import build_model
from lxtrain.model import attention
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining

REPO = Path(__file__).resolve().parent.parent
CPU_CONFIG = str(REPO / "ds_configs" / "cpu_tiny.json")


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attention.ENV_OVERRIDE, raising=False)


def _backends(model: torch.nn.Module) -> set[str]:
    return {module.backend for module in model.modules() if isinstance(module, attention.BackendDispatch)}


def _pretrain_args(tmp_path: Path, *extra: str) -> PretrainConfig:
    base = ["--deepspeed_config", CPU_CONFIG, "--train-shards", str(tmp_path), "--output-dir", str(tmp_path)]
    return parse_pretrain_args([*base, "--model", "tiny", *extra])


def test_pretrain_flag_reaches_every_dispatching_module(tmp_path: Path) -> None:
    assert _pretrain_args(tmp_path).attention == "auto"
    cfg = _pretrain_args(tmp_path, "--attention", "eager")
    config = cfg.model_config(feature_dim=16, num_answers=8)
    assert config.attention_backend == "eager"
    model = LxmertForPretraining(config)
    assert _backends(model) == {"eager"}
    # Single-modality layers: one attention, one feed-forward; cross layers: three and two.
    single = config.num_language_layers + config.num_object_layers
    expected = 2 * single + 5 * config.num_cross_layers
    assert sum(isinstance(m, attention.BackendDispatch) for m in model.modules()) == expected
    assert attention.attention_backend_of(model) == "eager"
    with pytest.raises(SystemExit):  # argparse: "invalid choice", with the choices
        _pretrain_args(tmp_path, "--attention", "flash")
    with pytest.raises(ValueError, match="--attention 'flash'"):
        PretrainConfig(**{**dataclasses.asdict(cfg), "attention": "flash"})


def test_a_model_json_must_not_contradict_the_flag(tmp_path: Path) -> None:
    model_json = tmp_path / "model.json"
    LxmertConfig.tiny(attention_backend="eager").save(model_json)
    assert _pretrain_args(tmp_path, "--model", str(model_json), "--attention", "eager").model_config()
    with pytest.raises(ValueError, match="attention_backend is 'eager' but --attention is 'sdpa'"):
        _pretrain_args(tmp_path, "--model", str(model_json), "--attention", "sdpa").model_config()
    LxmertConfig.tiny().save(model_json)  # auto in the JSON: the flag decides
    config = _pretrain_args(tmp_path, "--model", str(model_json), "--attention", "sdpa").model_config()
    assert config.attention_backend == "sdpa"


def test_finetune_flag_reaches_a_model_built_from_a_stored_config(tmp_path: Path) -> None:
    argv = ["--task", "vqa", "--deepspeed_config", CPU_CONFIG, "--init", str(tmp_path)]
    argv += ["--train-shards", str(tmp_path), "--output-dir", str(tmp_path)]
    assert parse_finetune_args(argv).attention == "auto"
    cfg = parse_finetune_args([*argv, "--attention", "eager"])
    # A pre-training run's stored config names its own backend; the fine-tuning run's flag decides.
    model = build_model("vqa", LxmertConfig.tiny(attention_backend="sdpa"), 5)
    assert _backends(model) == {"sdpa"}
    assert attention.set_attention_backend(model, cfg.attention) == "eager"
    assert _backends(model) == {"eager"}
    with pytest.raises(SystemExit):
        parse_finetune_args([*argv, "--attention", "flash"])
    with pytest.raises(ValueError, match="--attention 'flash'"):
        FinetuneConfig(**{**dataclasses.asdict(cfg), "attention": "flash"})


def test_the_environment_override_wins_over_flag_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(attention.ENV_OVERRIDE, "sdpa")
    cfg = _pretrain_args(tmp_path, "--attention", "eager")
    assert _backends(LxmertForPretraining(cfg.model_config())) == {"sdpa"}
    model = build_model("nlvr2", LxmertConfig.tiny(attention_backend="eager"), 0)
    assert attention.set_attention_backend(model, "eager") == "sdpa"
    assert _backends(model) == {"sdpa"}
    monkeypatch.setenv(attention.ENV_OVERRIDE, "flash")
    with pytest.raises(ValueError, match="'flash'.*environment variable LXTRAIN_ATTENTION"):
        LxmertForPretraining(LxmertConfig.tiny())


class _CountingEnviron(MutableMapping):
    """os.environ that records which keys are read."""

    def __init__(self, environ: MutableMapping[str, str]) -> None:
        self._environ = environ
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.reads.append(key)
        return self._environ[key]

    def __contains__(self, key: object) -> bool:
        self.reads.append(str(key))
        return key in self._environ

    def __setitem__(self, key: str, value: str) -> None:
        self._environ[key] = value

    def __delitem__(self, key: str) -> None:
        del self._environ[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


@pytest.mark.parametrize("backend", ["auto", "eager", "sdpa"])
def test_no_forward_reads_the_environment(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", counting)
    config = LxmertConfig.tiny(attention_backend=backend)
    model = LxmertForPretraining(config).train()
    assert counting.reads.count(attention.ENV_OVERRIDE) == 1, "read once, when the model is built"
    batch = build_batch(config)
    counting.reads.clear()
    for _ in range(2):
        model(*(batch[key] for key in B.MODEL_INPUT_KEYS)).backbone.pooled.sum().backward()
    assert attention.ENV_OVERRIDE not in counting.reads
    assert not [key for key in counting.reads if key.startswith("LXTRAIN")]


def _zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}}


def test_engine_refuses_fused_under_zero3_naming_the_flag_and_the_fix(tmp_path: Path) -> None:
    model = LxmertForPretraining(LxmertConfig.tiny(attention_backend="fused"))
    with pytest.raises(engine.ConfigError, match="--attention fused.*ZeRO stage 3.*--attention auto or sdpa"):
        engine.check_attention_backend(model, _zero(3))
    source = tmp_path / "zero3.json"
    source.write_text(json.dumps(_zero(3)))
    with pytest.raises(engine.ConfigError, match=f"^{source}: .*LXTRAIN_ATTENTION"):
        engine.check_attention_backend(model, _zero(3), str(source))
    # The refusal comes before DeepSpeed is even imported.
    with pytest.raises(engine.ConfigError, match="ZeRO stage 3"):
        engine.initialize(model, _zero(3))
    for stage in (0, 1, 2):
        engine.check_attention_backend(model, _zero(stage))
    engine.check_attention_backend(model, {})


def _epilogue_flags(model: torch.nn.Module) -> set[bool]:
    return {m.fused_epilogues for m in model.modules() if isinstance(m, attention.BackendDispatch)}


def test_engine_keeps_auto_epilogues_exact_under_zero3_only() -> None:
    flags = _epilogue_flags
    model = LxmertForPretraining(LxmertConfig.tiny())
    engine.check_attention_backend(model, _zero(2))
    assert flags(model) == {True}
    engine.check_attention_backend(model, _zero(3))
    assert flags(model) == {False}
    assert attention.attention_backend_of(model) == "auto"  # attention itself keeps its choice
    exact = LxmertForPretraining(LxmertConfig.tiny(attention_backend="sdpa"))
    engine.check_attention_backend(exact, _zero(3))
    assert flags(exact) == {True}  # nothing fused to keep out
