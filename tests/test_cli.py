"""lxtrain.cli: one dataclass-to-argparse builder for both entry points, and what each relies on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lxtrain import cli
from lxtrain.config import PretrainConfig
from lxtrain.config import parse_args as parse_pretrain_args
from lxtrain.downstream.config import FinetuneConfig
from lxtrain.downstream.config import parse_args as parse_finetune_args

CPU_CONFIG = str(Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_tiny.json")


@dataclasses.dataclass
class _Run:
    deepspeed_config: str
    """The JSON; 100% required."""
    out: str = dataclasses.field(default=None, metadata={"help": "where to write", "required": True})
    steps: int | None = None
    """Stop after this many steps."""
    rate: float = 0.5
    mode: str = dataclasses.field(default="a", metadata={"help": "mode"})
    fast: bool = False
    """Go fast."""


def test_flags_types_defaults_and_help_from_either_source() -> None:
    parser = cli.build_parser(_Run, prog="run", description="d", choices={"mode": ("a", "b")})
    run = cli.parse_config(_Run, ["--deepspeed-config", "x", "--out", "o"], prog="run", description="d")
    assert run == _Run(deepspeed_config="x", out="o")
    run = cli.parse_config(
        _Run,
        [
            "--deepspeed_config",
            "x",
            "--out",
            "o",
            "--steps",
            "3",
            "--rate",
            "2",
            "--fast",
            "--local_rank",
            "1",
        ],
        prog="run",
        description="d",
    )
    assert (run.steps, run.rate, run.fast) == (3, 2.0, True)
    text = parser.format_help()
    assert "--deepspeed_config DEEPSPEED_CONFIG, --deepspeed-config" in text
    assert "100% required" in text and "where to write" in text and "Stop after this many steps." in text
    assert "--fast, --no-fast" in text and "--mode {a,b}" in text and "local_rank" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--deepspeed_config", "x"])  # --out is required by its metadata
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o"])  # deepspeed_config is required: it has no default
    with pytest.raises(SystemExit):
        parser.parse_args(["--deepspeed_config", "x", "--out", "o", "--mode", "c"])


def test_both_entry_points_parse_their_whole_dataclass(tmp_path: Path) -> None:
    pretrain = parse_pretrain_args(
        ["--deepspeed_config", CPU_CONFIG, "--train-shards", "s", "--output-dir", "o", "--no-export"]
    )
    assert pretrain.export is False and pretrain.epochs == 20.0 and pretrain.max_steps is None
    assert {f.name for f in dataclasses.fields(PretrainConfig)} == set(dataclasses.asdict(pretrain))
    finetune = parse_finetune_args(
        ["--task", "gqa", "--deepspeed-config", CPU_CONFIG, "--init", str(tmp_path)]
        + ["--train-shards", "s", "--output-dir", "o", "--lr", "1e-4", "--local-rank", "0"]
    )
    assert finetune.lr == 1e-4 and finetune.task == "gqa" and finetune.from_scratch is False
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} == set(dataclasses.asdict(finetune))
    # The pre-training help is the fields' docstrings, with argparse's % escaped.
    docs = cli.attribute_docs(PretrainConfig)
    assert docs["mlm_capacity"].startswith("Share of a micro-batch")
    assert "%" in docs["warmup_fraction"]
