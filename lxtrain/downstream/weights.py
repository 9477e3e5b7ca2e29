"""Where fine-tuning starts and what it leaves: pre-trained weights in, fine-tuned models out.

``--init SRC`` accepts, detected from what SRC holds (or named with ``--init-format``):

| format | SRC |
|---|---|
| ``lxtrain`` | an lxtrain weights directory (``lxtrain_config.json`` + ``model.safetensors``), e.g. ``RUN/export`` |
| ``checkpoint`` | an lxtrain pre-training checkpoint: a tag directory ``RUN/checkpoints/step00001000``, ``RUN/checkpoints`` or ``RUN`` (newest complete tag); DeepSpeed/ZeRO partitions are consolidated in memory |
| ``hf`` | an HF transformers ``LxmertForPreTraining`` directory (``config.json``) |
| ``original`` | the reference release's ``model_LXRT.pth`` |

The pre-training answer table (needed to transfer the QA head by answer string) comes from
``--pretrain-answers`` (``all_ans.json``, a JSON list, or a shard directory / ``index.json``),
or, for lxtrain runs, from the run's own training shards (``RUN/run_config.json``).

A fine-tuned model is a directory with ``finetune.json`` (task, answer table, backbone config)
and ``model.safetensors`` (keys ``backbone.*`` and ``head.*``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lxtrain import checkpoint, convert
from lxtrain.data.finetune_shards import load_task_answers
from lxtrain.model import LxmertConfig
from lxtrain.model.heads import AnswerHead

INIT_FORMATS = ("auto", "lxtrain", "checkpoint", "hf", "original")
FINETUNED_FORMAT = "lxtrain-finetuned/1"
FINETUNED_META = "finetune.json"
RUN_CONFIG = "run_config.json"


@dataclass
class Pretrained:
    """Pre-trained weights in lxtrain names, their config, and (when known) the QA answer table."""

    state: dict[str, torch.Tensor]
    config: LxmertConfig
    answers: list[str] | None
    source: str
    fmt: str


def detect_format(source: str | Path) -> str:
    """The init format of ``source``; ValueError naming what was expected when nothing fits."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--init {source}: no such file or directory")
    if path.is_file():
        return "original"
    if (path / FINETUNED_META).exists():
        raise ValueError(
            f"--init {source} is a fine-tuned model; fine-tuning starts from pre-trained weights "
            "(score fine-tuned models with python -m lxtrain.evaluate)"
        )
    if (path / convert.LXTRAIN_CONFIG).exists():
        return "lxtrain"
    if (path / "config.json").exists():
        return "hf"
    if _checkpoint_location(path) is not None:
        return "checkpoint"
    raise ValueError(
        f"--init {source}: not an lxtrain export (lxtrain_config.json), an lxtrain checkpoint "
        "(checkpoints/stepN with COMPLETE), an HF directory (config.json) or a model_LXRT.pth file"
    )


def _checkpoint_location(path: Path) -> tuple[Path, str] | None:
    """(checkpoints directory, tag) for a tag dir, a checkpoints dir or a run dir."""
    if (path / checkpoint.COMPLETE).exists():
        return path.parent, path.name
    for directory in (path, path / "checkpoints"):
        tag = checkpoint.find_resume_tag(directory)
        if tag is not None:
            return directory, tag
    return None


def _run_dir_of(path: Path, fmt: str) -> Path | None:
    """The pre-training run directory an lxtrain export or checkpoint belongs to, if any."""
    for candidate in (path, *path.parents[:3]):
        if (candidate / RUN_CONFIG).exists():
            return candidate
    return None


def read_answer_list(source: str | Path) -> list[str]:
    """A pre-training answer table: all_ans.json, label2ans/ans2label JSON, or a shard set's index."""
    path = Path(source)
    index_path = path / "index.json" if path.is_dir() else path
    raw = json.loads(index_path.read_text())
    if isinstance(raw, dict) and isinstance(raw.get("answers"), dict):  # a pre-training shard index
        return list(raw["answers"]["list"])
    if isinstance(raw, dict) and isinstance(raw.get("answers"), list):  # a fine-tuning shard index
        return list(raw["answers"])
    return load_task_answers(index_path).answers


def _answers_of_run(run_dir: Path) -> list[str] | None:
    shards = json.loads((run_dir / RUN_CONFIG).read_text()).get("lxtrain", {}).get("train_shards")
    if not shards:
        return None
    try:
        return read_answer_list(shards)
    except (OSError, ValueError):
        return None


def _read_checkpoint(directory: Path, tag: str) -> tuple[dict[str, torch.Tensor], LxmertConfig]:
    run_config = directory.parent / RUN_CONFIG
    if not run_config.exists():
        raise FileNotFoundError(
            f"{directory / tag}: no {run_config} next to the checkpoints (the model config)"
        )
    record = json.loads(run_config.read_text())
    if "task" in record.get("lxtrain", {}):
        raise ValueError(
            f"{directory / tag} belongs to a {record['lxtrain']['task']} fine-tuning run; --init takes "
            "pre-trained weights (score fine-tuned models with python -m lxtrain.evaluate)"
        )
    config = LxmertConfig.from_dict(record["model"])
    state = checkpoint.fp32_state_dict(directory, tag, prefix="model.")  # the objective's .model
    convert.check_state_dict(state, config, str(directory / tag))
    return state, config


def load_pretrained(
    source: str | Path, fmt: str = "auto", pretrain_answers: str | None = None, num_attention_heads: int = 12
) -> Pretrained:
    """Read pre-trained weights of any supported format, strictly checked."""
    path = Path(source)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in INIT_FORMATS[1:]:
        raise ValueError(f"--init-format {fmt!r} is not one of {INIT_FORMATS}")
    if fmt == "checkpoint":
        location = _checkpoint_location(path)
        if location is None:
            raise FileNotFoundError(f"--init {source}: no complete lxtrain checkpoint found")
        state, config = _read_checkpoint(*location)
    else:
        state, config = convert.read(fmt, path, num_attention_heads)
    answers = None
    if pretrain_answers:
        answers = read_answer_list(pretrain_answers)
    elif fmt in ("lxtrain", "checkpoint") and (run_dir := _run_dir_of(path, fmt)) is not None:
        answers = _answers_of_run(run_dir)
    return Pretrained(state, config, answers, str(source), fmt)


def pretrained_answer_head(pretrained: Pretrained) -> AnswerHead:
    """The pre-training QA head as a module (the source of the answer-head transfer)."""
    head = AnswerHead(pretrained.config)
    prefix = "answer_head."
    head.load_state_dict({k[len(prefix) :]: v for k, v in pretrained.state.items() if k.startswith(prefix)})
    return head


def backbone_state(pretrained: Pretrained) -> dict[str, torch.Tensor]:
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in pretrained.state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------
# Fine-tuned models.


def save_finetuned(
    state: dict[str, torch.Tensor],
    config: LxmertConfig,
    task: str,
    answers: list[str] | None,
    directory: Path,
) -> Path:
    """Write a fine-tuned model directory atomically (temporary directory, then rename)."""
    directory = Path(directory)
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, temporary / convert.WEIGHTS)
    meta = {"format": FINETUNED_FORMAT, "task": task, "answers": answers, "model": config.to_dict()}
    (temporary / FINETUNED_META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)
    return directory


@dataclass
class Finetuned:
    model: torch.nn.Module
    task: str
    answers: list[str] | None
    config: LxmertConfig


def load_finetuned(directory: str | Path) -> Finetuned:
    """A fine-tuned model ready for inference (strict load: every key must fit)."""
    from lxtrain.downstream.models import build_model

    directory = Path(directory)
    meta_path = directory / FINETUNED_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{directory}: not a fine-tuned lxtrain model (no {FINETUNED_META}); fine-tuning writes them to "
            "RUN/export and RUN/best"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FINETUNED_FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
    config = LxmertConfig.from_dict(meta["model"])
    answers = meta.get("answers")
    model = build_model(meta["task"], config, len(answers) if answers else None)
    model.load_state_dict(load_file(directory / convert.WEIGHTS), strict=True)
    return Finetuned(model.eval(), meta["task"], answers, config)
