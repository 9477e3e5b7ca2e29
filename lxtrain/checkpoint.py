"""Checkpoints: save through DeepSpeed, mark complete atomically, auto-resume, keep the last K, export.

Layout of ``OUTPUT_DIR/checkpoints``::

    step00000100/          one DeepSpeed tag: model + optimizer (+ ZeRO partitions) of every rank,
      lxtrain_state.json   step, epoch, loader position, config (rank 0)
      rng_rank{R}.pt       torch RNG states of rank R (dropout)
      COMPLETE             written last, by rank 0, after every rank finished writing
    latest                 name of the newest complete tag, replaced atomically

A tag without ``COMPLETE`` is a half-written checkpoint (the job died while saving, or the disk
filled up): it is never picked by ``--resume auto`` and is removed at the next save.

Loading never runs code from a file: every ``torch.load`` during :func:`load` is forced to
``weights_only`` (torch's restricted unpickler), with exactly the DeepSpeed classes its ZeRO
checkpoints hold allowed; a file that needs anything else is refused, named in the error.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lxtrain import distributed

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "lxtrain_state.json"
TAG_PATTERN = re.compile(r"^step(\d{8})$")
# torch's switch that makes every torch.load weights-only, even where the caller asks otherwise.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file whose pickle needs more than tensors and DeepSpeed's plain state classes."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, quota, file-size limit...); the message says where and why."""


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


def save(
    engine,
    directory: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    before_complete: Callable[[], None] | None = None,
) -> Path:
    """Save a checkpoint on every rank; returns its directory once it is complete everywhere.

    A collective: every rank must call it with the same step. A failed write raises
    :class:`CheckpointSaveError` on the rank that hit it, which must then stop: DeepSpeed's save is
    itself a sequence of collectives, so the ranks cannot agree on the failure and carry on (the
    others stop when the launcher or the broken connection ends them). ``before_complete`` runs
    once every rank's files are written and before the ``COMPLETE`` marker (fault injection).
    """
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        stale = directory / tag
        if stale.exists():  # a half-written earlier attempt at the same step
            shutil.rmtree(stale)
    _barrier()
    try:
        engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
        torch.save(_rng_state(), directory / tag / f"rng_rank{rank}.pt")
        if rank == 0:
            _atomic_write_text(directory / tag / STATE, json.dumps(state, indent=2, sort_keys=True))
    except (OSError, RuntimeError) as error:
        if distributed.is_lost_peer_error(error):
            raise  # a peer is gone: the caller reports it as such, not as a disk problem
        raise CheckpointSaveError(_save_failure_message(directory, tag, error)) from error
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if before_complete is not None:
        before_complete()
    if rank == 0:
        _atomic_write_text(directory / tag / COMPLETE, "")
        _atomic_write_text(directory / LATEST, tag + "\n")
        _prune(directory, keep_last)
    _barrier()
    return directory / tag


def _save_failure_message(directory: Path, tag: str, error: BaseException) -> str:
    """Where the save failed, the likely cause and what to do; torch's zip writer reports a full
    disk or a file-size limit only as a position mismatch, so the limits are checked here."""
    causes = []
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft_limit != resource.RLIM_INFINITY:
        causes.append(f"a file-size limit (ulimit -f) of {soft_limit} bytes is set")
    try:
        free = shutil.disk_usage(directory).free
        causes.append(f"{free / 2**20:.1f} MiB free on its file system")
    except OSError:
        pass
    previous = find_resume_tag(directory)
    resume_from = f"{directory / previous}" if previous else "the start (no complete checkpoint yet)"
    return (
        f"{directory / tag}: saving the checkpoint failed: {', '.join(causes) or 'no limit found'} "
        f"({type(error).__name__}: {error}). The disk is full or a quota / file-size limit was "
        f"hit: make room (or raise the limit) and rerun with --resume auto, which continues from "
        f"{resume_from}; the incomplete {tag} is never resumed and is removed at the next save"
    )


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
        with weights_only_loads(engine):
            loaded, _ = engine.load_checkpoint(
                str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            rng_file = path / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(safe_torch_load(rng_file))
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # truncated or corrupt files surface as many exception types
        raise RuntimeError(
            f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); move it aside to resume "
            "from the previous one, or pass --resume PATH / --resume none"
        ) from error
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load in this directory")
    return state


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes (beyond tensors and containers) in DeepSpeed's ZeRO 1-3 optimizer states:
    plain data holders whose unpickling sets attributes and runs no code of their own."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` restricted to tensors, containers and DeepSpeed's state classes.

    Raises :class:`UnsafeCheckpointError` naming the file when its pickle asks for anything else
    (which is when a crafted file would run code).
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle needs more than tensors and DeepSpeed's state classes "
            f"({_unpickling_reason(error)}). Loading it could run code from the file; if you trust its origin, "
            "inspect it with torch.serialization.get_unsafe_globals_in_checkpoint, otherwise delete it "
            "and resume from another checkpoint (--resume PATH) or start fresh (--resume none)"
        ) from None


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only message that says what the file asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0]


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with its ``load`` (which asks for ``weights_only=False``)
    replaced by :func:`safe_torch_load`; everything else is delegated unchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


@contextlib.contextmanager
def weights_only_loads(engine: Any = None) -> Iterator[None]:
    """Within the block, every ``torch.load`` is a weights-only load (DeepSpeed's state classes allowed).

    torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the ``weights_only=False`` that DeepSpeed
    passes explicitly (engine loads, ``zero_to_fp32``). With an ``engine``, its checkpoint engine's
    ``load`` is also swapped for :func:`safe_torch_load`, so that a refused file is named.
    """
    original_flag = os.environ.get(FORCE_WEIGHTS_ONLY)
    original_engine = engine.checkpoint_engine if engine is not None else None
    if engine is not None:
        engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(original_engine)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        if engine is not None:
            engine.checkpoint_engine = original_engine
        if original_flag is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = original_flag


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

    with weights_only_loads():
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
