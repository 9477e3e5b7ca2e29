"""Checkpoints: save through DeepSpeed, mark complete atomically, auto-resume, keep the last K, export.

Layout of ``OUTPUT_DIR/checkpoints``::

    step00000100/          one DeepSpeed tag: model + optimizer (+ ZeRO partitions) of every rank,
      lxtrain_state.json   step, epoch, loader position, config (rank 0)
      rng_rank{R}.pt       torch RNG states of rank R (dropout)
      COMPLETE             written last, by rank 0, after every rank finished writing
    latest                 name of the newest complete tag, replaced atomically

A tag without ``COMPLETE`` is a half-written checkpoint (the job died while saving): it is never
picked by ``--resume auto`` and is removed at the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "lxtrain_state.json"
TAG_PATTERN = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def complete_tags(directory: Path) -> list[str]:
    """Complete checkpoint tags in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE).exists()]
    return sorted(tags)


def find_resume_tag(directory: Path) -> str | None:
    """The newest complete tag, or None. Incomplete tags are ignored whatever ``latest`` says."""
    tags = complete_tags(directory)
    return tags[-1] if tags else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Save a checkpoint on every rank; returns its directory once it is complete everywhere.

    A collective: every rank must call it with the same step.
    """
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        stale = directory / tag
        if stale.exists():  # a half-written earlier attempt at the same step
            shutil.rmtree(stale)
    _barrier()
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
    torch.save(_rng_state(), directory / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        _atomic_write_text(directory / tag / STATE, json.dumps(state, indent=2, sort_keys=True))
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        _atomic_write_text(directory / tag / COMPLETE, "")
        _atomic_write_text(directory / LATEST, tag + "\n")
        _prune(directory, keep_last)
    _barrier()
    return directory / tag


def _prune(directory: Path, keep_last: int) -> None:
    tags = complete_tags(directory)
    for tag in tags[: max(0, len(tags) - keep_last)]:
        shutil.rmtree(directory / tag, ignore_errors=True)
    for path in directory.iterdir():  # leftovers of saves that died half-way
        if TAG_PATTERN.match(path.name) and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)


def load(engine, directory: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return the lxtrain state of the tag."""
    path = directory / tag
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"{path / STATE}: unreadable checkpoint state ({error})") from None
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        loaded, _ = engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
    except Exception as error:  # truncated or corrupt files surface as many exception types
        raise RuntimeError(
            f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); move it aside to resume "
            "from the previous one, or pass --resume PATH / --resume none"
        ) from error
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load in this directory")
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_fp32(directory: Path, tag: str, destination: Path, model_config, prefix: str = "model.") -> Path:
    """Consolidate a (ZeRO-partitioned) checkpoint into fp32 weights in lxtrain format (rank 0 only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lxtrain.convert import write_lxtrain

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    state = {
        key[len(prefix) :]: tensor.float().contiguous()
        for key, tensor in consolidated.items()
        if key.startswith(prefix)
    }
    temporary = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    write_lxtrain(state, model_config, temporary)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination
