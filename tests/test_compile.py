"""``--compile``: the model plus objective as one graph, the same losses as eager, clear failures."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_batch

from lxtrain import compiling
from lxtrain.model.config import LxmertConfig
from lxtrain.model.lxmert import LxmertForPretraining
from lxtrain.tasks import objectives
from lxtrain.tasks.objectives import TASKS, PretrainingObjective
from lxtrain.testing.faults import make_corpus, run_pretrain, step_losses

ALL_TASKS = dict.fromkeys(TASKS, 1.0)


def _objective(compile_mode: str = "off", fallback: bool = False, seed: int = 0) -> PretrainingObjective:
    torch.manual_seed(seed)
    model = LxmertForPretraining(LxmertConfig.tiny())
    return PretrainingObjective(model, compile_mode=compile_mode, compile_fallback=fallback).train()


def test_model_and_objective_trace_as_one_graph():
    objective = _objective()
    batch = build_batch(objective.model.config)
    assert not objective.compiled and _objective("default").compiled
    explained = torch._dynamo.explain(objective._objectives)(batch, ALL_TASKS)
    reasons = [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.inductor
def test_compiled_step_gives_eager_losses_over_three_steps(monkeypatch):
    # Inductor draws dropout masks with its own generator unless told to use eager's.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    runs = {}
    for mode in ("off", "default"):
        objective = _objective(mode)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
        torch.manual_seed(1)  # the same dropout masks for both runs
        losses = []
        for step in range(3):
            batch = build_batch(objective.model.config, seed=step)
            output = objective(batch, ALL_TASKS)
            output.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append({task: loss.item() for task, loss in output.losses.items()})
        runs[mode] = losses
    for step, (eager, compiled) in enumerate(zip(runs["off"], runs["default"], strict=True)):
        assert eager.keys() == compiled.keys() == set(TASKS)
        for task in eager:
            assert compiled[task] == pytest.approx(eager[task], rel=1e-5, abs=1e-6), (step, task)
    assert runs["off"][0] != runs["off"][2]  # the steps really trained


def _with_a_graph_break(monkeypatch) -> None:
    original = objectives.pretraining_objectives

    def logs_inside(*args, **kwargs):
        output = original(*args, **kwargs)
        logging.getLogger("lxtrain.test").info("inside the step")  # dynamo cannot trace logging
        return output

    monkeypatch.setattr(objectives, "pretraining_objectives", logs_inside)


def test_forced_mode_fails_naming_the_op(monkeypatch):
    _with_a_graph_break(monkeypatch)
    objective = _objective("default")
    batch = build_batch(objective.model.config)
    with pytest.raises(
        compiling.CompileFailed,
        match=r"--compile default: .*test_compile.py:\d+: logging.getLogger.*--compile off",
    ):
        objective(batch, ALL_TASKS)


def test_auto_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    _with_a_graph_break(monkeypatch)
    objective = _objective("default", fallback=True)
    batch = build_batch(objective.model.config)
    with caplog.at_level(logging.WARNING, logger="lxtrain.compiling"):
        first = objective(batch, ALL_TASKS)
        second = objective(batch, ALL_TASKS)
    assert torch.isfinite(first.total) and torch.isfinite(second.total)
    assert not objective.compiled  # eager from the first failure on
    fallbacks = [record for record in caplog.records if "continuing eager" in record.getMessage()]
    assert len(fallbacks) == 1


@pytest.mark.parametrize(
    "requested, device, stage, expected",
    [
        ("auto", "cpu", 2, "off"),
        ("auto", "cuda", 2, "default"),
        ("auto", "cuda", 3, "off"),
        ("off", "cuda", 2, "off"),
        ("default", "cpu", 2, "default"),
        ("cudagraphs", "cuda", 1, "cudagraphs"),
    ],
)
def test_resolved_mode(requested, device, stage, expected):
    assert compiling.resolve_compile_mode(requested, device, stage) == expected


@pytest.mark.parametrize(
    "requested, device, stage, message",
    [
        ("cudagraphs", "cpu", 2, "CUDA graphs need a CUDA GPU"),
        ("default", "cuda", 3, "ZeRO-3"),
        ("fast", "cpu", 2, "is not one of"),
    ],
)
def test_modes_that_cannot_work_are_refused(requested, device, stage, message):
    with pytest.raises(ValueError, match=message):
        compiling.resolve_compile_mode(requested, device, stage)


@pytest.mark.inductor
@pytest.mark.multiproc
def test_pretrain_compiles_inside_the_deepspeed_engine_on_two_ranks(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    losses = {}
    for mode, port in (("off", 29641), ("default", 29642)):
        result = run_pretrain(
            corpus,
            tmp_path / mode,
            "--max-steps",
            "3",
            "--no-export",
            "--compile",
            mode,
            port=port,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"compile {mode}" in result.stdout  # compiled, not fallen back (a named mode never falls back)
        losses[mode] = step_losses(tmp_path / mode)
    assert sorted(losses["default"]) == [1, 2, 3]
    for step, eager in losses["off"].items():
        compiled = losses["default"][step]
        assert compiled.keys() == eager.keys()
        # Dropout masks differ (Inductor's generator), so close, not equal: a wrong graph is far off.
        for task, value in eager.items():
            assert compiled[task] == pytest.approx(value, rel=0.02), (step, task)
