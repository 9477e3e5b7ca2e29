"""Fine-tuning run configuration: one dataclass whose field metadata is the CLI help."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lxtrain.cli import parse_config
from lxtrain.data.finetune_shards import TASKS
from lxtrain.downstream.weights import INIT_FORMATS
from lxtrain.model.config import ATTENTION_BACKENDS


def _field(default: Any, help_text: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text, **extra})


@dataclasses.dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs besides the DeepSpeed JSON (SPEC 4 defaults)."""

    task: str = _field(None, f"task: one of {TASKS}", required=True)
    deepspeed_config: str = _field(None, "DeepSpeed JSON (ds_configs/finetune_<task>.json)", required=True)
    init: str = _field(
        None, "pre-trained weights: lxtrain export/checkpoint, HF dir or model_LXRT.pth", required=True
    )
    train_shards: str = _field(None, "fine-tuning shard directory of the training split", required=True)
    output_dir: str = _field(None, "run directory: checkpoints/, tensorboard/, export/, best/", required=True)
    valid_shards: str | None = _field(None, "shard directory of the validation split (labelled)")
    init_format: str = _field("auto", f"format of --init: one of {INIT_FORMATS}")
    from_scratch: bool = _field(
        False, "random weights with the architecture of --init (the no-pre-training baseline)"
    )
    pretrain_answers: str | None = _field(
        None,
        "pre-training answer table for the QA-head transfer (all_ans.json or a shard dir); "
        "default: the lxtrain run's own",
    )
    num_attention_heads: int = _field(12, "head count of an 'original' checkpoint (not stored in the file)")
    epochs: float = _field(4.0, "epochs over the training split (the paper: 4)")
    max_steps: int | None = _field(
        None, "stop after this many optimiser steps (the LR schedule still spans all epochs)"
    )
    lr: float | None = _field(None, "peak learning rate, overriding the DeepSpeed JSON's optimizer lr")
    warmup_fraction: float = _field(0.1, "share of all steps in linear LR warm-up (SPEC 4: 10%)")
    seed: int = _field(9595, "seed of head init, data order and dropout")
    resume: str = _field(
        "auto", "auto: newest complete checkpoint in output_dir; none: start fresh; or a tag path"
    )
    save_every: int = _field(1000, "checkpoint every N optimiser steps (and at every epoch end)")
    keep_last: int = _field(2, "complete checkpoints to keep")
    log_every: int = _field(10, "log training scalars every N steps")
    valid_every: int = _field(0, "validate every N steps (0: at epoch ends only)")
    max_valid_batches: int | None = _field(None, "cap on validation batches per rank")
    num_workers: int = _field(1, "data-loader worker processes per rank (0: load in the training process)")
    tokenizer: str | None = _field(None, "path to a BERT vocab.txt (default: the offline BERT uncased one)")
    attention: str = _field(
        "auto",
        f"attention backend: one of {ATTENTION_BACKENDS} (auto: sdpa today; fused: GPU kernels, not under "
        "ZeRO-3); the environment variable LXTRAIN_ATTENTION, if set, wins",
    )
    max_bad_steps: int = _field(5, "stop after this many non-finite losses in a row")
    collective_timeout_s: float = _field(300.0, "upper bound on any collective")
    export: bool = _field(
        True, "write fp32 fine-tuned models: RUN/export (final) and RUN/best (best validation)"
    )
    verbose: bool = _field(
        False,
        "also show DeepSpeed's, torch's and Python warnings' INFO/WARNING output on the console "
        "(always in OUTPUT_DIR/logs/rank<N>.log)",
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {TASKS}")
        if self.init_format not in INIT_FORMATS:
            raise ValueError(f"--init-format {self.init_format!r} is not one of {INIT_FORMATS}")
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0; got {self.epochs}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction must be in [0, 1); got {self.warmup_fraction}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention {self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if not Path(self.deepspeed_config).is_file():
            raise FileNotFoundError(f"--deepspeed_config {self.deepspeed_config}: no such file")
        if not Path(self.init).exists():
            raise FileNotFoundError(f"--init {self.init}: no such file or directory")


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    """Flags are the field names with dashes (``--train-shards``); ``--deepspeed_config`` also works."""
    return parse_config(
        FinetuneConfig,
        argv,
        prog="lxtrain/finetune.py",
        description="LXMERT fine-tuning with DeepSpeed",
        choices={"attention": ATTENTION_BACKENDS},
    )
