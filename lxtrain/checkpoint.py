"""Checkpoints: save through DeepSpeed, mark complete atomically, auto-resume, keep the last K, export.

Layout of ``OUTPUT_DIR/checkpoints``::

    step00000100/          one DeepSpeed tag: model + optimizer (+ ZeRO partitions) of every rank,
      lxtrain_state.json   step, epoch, loader position, config, the run's identity (model
                           shape, shard fingerprint) and the writer's DP world size / ZeRO stage
      rng_rank{R}.pt       torch RNG states of rank R (dropout)
      COMPLETE             written last, by rank 0, after every rank finished writing
      universal/           DeepSpeed universal form of the tag, made on the first resume on another
                           DP world size (or ZeRO stage) and reused afterwards (docs/elastic.md)
    latest                 name of the newest complete tag, replaced atomically

A tag without ``COMPLETE`` is a half-written checkpoint (the job died while saving, or the disk
filled up): it is never picked by ``--resume auto`` and is removed at the next save.

Loading never runs code from a file: every ``torch.load`` during :func:`load` is forced to
``weights_only`` (torch's restricted unpickler), with exactly the DeepSpeed classes its ZeRO
checkpoints hold allowed; a file that needs anything else is refused, named in the error.

Before DeepSpeed reads anything, :func:`load` compares the checkpoint's identity (see
:func:`run_identity`) with this run's and refuses a checkpoint of another model shape or shard set,
naming each differing value.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
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
UNIVERSAL = "universal"
TAG_PATTERN = re.compile(r"^step(\d{8})$")
# torch's switch that makes every torch.load weights-only, even where the caller asks otherwise.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# The DeepSpeed facts of the writer, recorded in the state under this key (see save()).
WRITER = "deepspeed"
# LxmertConfig fields that fix the shapes of the parameters; the rest (dropout, attention backend,
# init range) may change on resume.
MODEL_IDENTITY_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "num_language_layers",
    "num_object_layers",
    "num_cross_layers",
    "max_position_embeddings",
    "type_vocab_size",
    "visual_feature_dim",
    "visual_position_dim",
    "num_object_labels",
    "num_attribute_labels",
    "num_qa_labels",
)

logger = logging.getLogger(__name__)


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

    ``state`` is the loop's own record (step, loader position, config; ``state["identity"]`` from
    :func:`run_identity`); the DP world size, ZeRO stage and precision of ``engine`` are added
    under ``"deepspeed"`` so that :func:`load` can tell a resume on another world size.

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
            record = {**state, WRITER: _writer_facts(engine)}
            _atomic_write_text(directory / tag / STATE, json.dumps(record, indent=2, sort_keys=True))
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


def _writer_facts(engine: Any) -> dict[str, Any]:
    """What a later resume must know of the writer: DP world size, ZeRO stage and precision."""
    return {
        "dp_world_size": _dp_world_size(engine),
        "zero_stage": _zero_stage(engine),
        "precision": _precision(engine),
    }


def _dp_world_size(engine: Any) -> int:
    # seq_dp_world_size is the size DeepSpeed compares with the checkpoint's (engine.py,
    # _load_zero_checkpoint); it equals the world size without model or sequence parallelism.
    world = dist.get_world_size() if dist.is_initialized() else 1
    return int(getattr(engine, "seq_dp_world_size", getattr(engine, "dp_world_size", world)))


def _zero_stage(engine: Any) -> int:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def _precision(engine: Any) -> str:
    for name, method in (("fp16", "fp16_enabled"), ("bf16", "bfloat16_enabled")):
        enabled = getattr(engine, method, None)
        if callable(enabled) and enabled():
            return name
    return "fp32"


# ------------------------------------------------------------------------------------------
# Identity: what a checkpoint must share with the run that resumes it.


def shard_identity(index: Any) -> dict[str, Any]:
    """What identifies a shard set, for comparing a checkpoint's data with a run's.

    ``index`` is a pre-training :class:`lxtrain.data.index.ShardIndex` or a fine-tuning index that
    wraps one in ``.shards``. The fingerprint hashes what decides the samples and their order
    (the index's name, feature shape, answer table and, per selected shard, its name and per-image
    sentence counts), not where the shards are read from: moving a shard set, or reading it
    through another URL, keeps its fingerprint.
    """
    task = None
    inner = getattr(index, "shards", None)
    if inner is not None and hasattr(inner, "shards"):  # a fine-tuning index wraps a ShardIndex
        task = getattr(index, "task", None)
        answers = getattr(index, "answers", None)
        index = inner
    else:
        answers = getattr(index, "answers", None)
    shards = list(index.shards)
    described = {
        "name": getattr(index, "name", ""),
        "task": task,
        "feature_dim": getattr(index, "feature_dim", None),
        "boxes_per_image": getattr(index, "boxes_per_image", None),
        "answers": list(answers) if answers is not None else None,
        "shards": [
            [shard.name, int(shard.images), [int(count) for count in shard.sentences_per_image]]
            for shard in shards
        ],
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return {
        "fingerprint": digest[:16],
        "name": described["name"],
        "shards": len(shards),
        "images": sum(int(shard.images) for shard in shards),
        "sentences": sum(int(shard.sentences) for shard in shards),
    }


def run_identity(model_config: Any, index: Any = None) -> dict[str, Any]:
    """The identity a loop records in ``state["identity"]`` and passes to :func:`load`.

    ``{"model": {field: value}}`` for the LxmertConfig fields that fix parameter shapes
    (:data:`MODEL_IDENTITY_FIELDS`: sizes, layer counts, heads, vocabulary, feature dimension,
    label counts), plus ``"shards"`` (:func:`shard_identity`) when ``index`` is given.
    """
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    identity: dict[str, Any] = {"model": {k: values[k] for k in MODEL_IDENTITY_FIELDS if k in values}}
    if index is not None:
        identity["shards"] = shard_identity(index)
    return identity


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, checkpoint's value, this run's value) for each identity value that differs.

    Only values present on both sides are compared (a checkpoint written before a field was
    recorded is not refused for it); a shard set is compared by its fingerprint.
    """
    differences = []
    for key in sorted(set(saved.get("model", {})) & set(current.get("model", {}))):
        if saved["model"][key] != current["model"][key]:
            differences.append((key, saved["model"][key], current["model"][key]))
    old, new = saved.get("shards"), current.get("shards")
    if old and new and old.get("fingerprint") != new.get("fingerprint"):
        differences.append(("shards", _describe_shards(old), _describe_shards(new)))
    return differences


def _describe_shards(shards: dict[str, Any]) -> str:
    return (
        f"{shards.get('name') or 'unnamed'!r} ({shards.get('shards')} shards, {shards.get('images')} images, "
        f"{shards.get('sentences')} sentences, fingerprint {shards.get('fingerprint')})"
    )


def check_identity(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise ValueError naming every identity value in which checkpoint ``path`` and this run differ."""
    if not saved:
        logger.warning("%s: written without a run identity; its model and shards are not checked", path)
        return
    differences = identity_differences(saved, current)
    if not differences:
        return
    written = ", ".join(f"{name}={old}" for name, old, _ in differences)
    running = ", ".join(f"{name}={new}" for name, _, new in differences)
    fixes = []
    if any(name != "shards" for name, _, _ in differences):
        fixes.append(
            "run with the model settings it was written with (--model and the shards' feature dimension)"
        )
    if any(name == "shards" for name, _, _ in differences):
        fixes.append("train on the shard set it was written with (--train-shards)")
    raise ValueError(
        f"--resume {path}: the checkpoint was written for {written}; this run has {running}. "
        f"Fix: {' and '.join(fixes)}, or start a new run (--resume none, or another --output-dir)"
    )


# ------------------------------------------------------------------------------------------
# Loading.


def read_state(directory: Path, tag: str) -> dict[str, Any]:
    """The lxtrain state of a complete tag (``lxtrain_state.json``); reads nothing of DeepSpeed's."""
    path = Path(directory) / tag
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"{path / STATE}: unreadable checkpoint state ({error})") from None


def saved_layout(path: Path, state: dict[str, Any]) -> tuple[int | None, int | None]:
    """(DP world size, ZeRO stage) that wrote the tag at ``path``; None where it cannot be told.

    From the state's ``"deepspeed"`` record; for checkpoints written before it, the world size is
    the number of ZeRO optimizer partitions in the tag (none: no ZeRO, stage 0).
    """
    writer = state.get(WRITER) or {}
    if "dp_world_size" in writer and "zero_stage" in writer:
        return int(writer["dp_world_size"]), int(writer["zero_stage"])
    partitions = len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    return (partitions, None) if partitions else (None, 0)


def load(engine: Any, directory: Path, tag: str, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``directory/tag``; return its lxtrain state.

    A collective: every rank calls it with the same arguments. With ``identity``
    (:func:`run_identity` of this run), a checkpoint of another model shape or shard set is
    refused with a ValueError before DeepSpeed reads anything. When the checkpoint was written
    with another DP world size or ZeRO stage, rank 0 converts the tag to DeepSpeed's universal
    form once (``tag/universal``, reused afterwards) while the others wait, and the engine loads
    that. Dropout RNG states cannot be carried to another world size: every rank then reseeds
    torch from (seed, step, rank) (docs/elastic.md).
    """
    path = Path(directory) / tag
    state = read_state(directory, tag)
    if identity is not None:
        check_identity(path, state.get("identity"), identity)
    rank = dist.get_rank() if dist.is_initialized() else 0
    saved_world, saved_stage = saved_layout(path, state)
    world, stage = _dp_world_size(engine), _zero_stage(engine)
    _check_stage_change(path, saved_stage, stage)
    elastic = stage > 0 and (saved_world != world or (saved_stage is not None and saved_stage != stage))
    try:
        with weights_only_loads(engine):
            if elastic:
                distributed.print0(
                    f"{path}: written on {saved_world} DP rank(s) with ZeRO-{saved_stage or '1/2/3'}, loading on {world} "
                    f"with ZeRO-{stage} through DeepSpeed's universal checkpoint ({path / UNIVERSAL})"
                )
                universal = _ensure_universal(path, saved_world, world)
                loaded = _load_universal(engine, universal)
                torch.manual_seed(elastic_seed(state, rank))
            else:
                loaded, _ = engine.load_checkpoint(
                    str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
                rng_file = path / f"rng_rank{rank}.pt"
                if rng_file.exists():
                    _set_rng_state(safe_torch_load(rng_file))
    except (UnsafeCheckpointError, UniversalConversionError):
        raise
    except Exception as error:  # truncated or corrupt files surface as many exception types
        raise RuntimeError(
            f"{path}: unreadable checkpoint ({type(error).__name__}: {error}); move it aside to resume "
            "from the previous one, or pass --resume PATH / --resume none"
        ) from error
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load in this directory")
    return state


def _check_stage_change(path: Path, saved_stage: int | None, stage: int) -> None:
    """Refuse the ZeRO stage changes DeepSpeed 0.19.8 cannot load, naming both stages.

    Between no ZeRO and ZeRO, DeepSpeed would silently start from fresh optimizer state. Between
    ZeRO-3 and ZeRO-1/2 the universal load fails: ZeRO-3 reads per-rank model-state files
    (``zero_pp_rank_0_mp_rank_00_model_states.pt``) that a ZeRO-1/2 checkpoint does not have, and
    ZeRO-1/2 read ``mp_rank_00_model_states.pt``, which a ZeRO-3 one does not have (seen).
    ZeRO-1 <-> ZeRO-2 goes through the universal form.
    """
    if saved_stage is None or saved_stage == stage:
        return
    if (saved_stage == 0) != (stage == 0) or (saved_stage == 3) != (stage == 3):
        raise ValueError(
            f"--resume {path}: the checkpoint was written with ZeRO stage {saved_stage}, this run uses ZeRO "
            f"stage {stage}; DeepSpeed cannot carry the optimizer state from one to the other. Fix: resume "
            f"with a DeepSpeed config of ZeRO stage {saved_stage} (zero_optimization.stage; any number of "
            "ranks works), or start a new run (--resume none)"
        )


def elastic_seed(state: dict[str, Any], rank: int) -> int:
    """The torch seed of ``rank`` after a resume on another world size: a hash of (the run's seed,
    the checkpoint's step, rank), so that such a resume is itself reproducible."""
    seed = (state.get("config") or {}).get("seed", 0)
    text = f"lxtrain-elastic:{seed}:{state.get('step', 0)}:{rank}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63


class UniversalConversionError(RuntimeError):
    """Converting a checkpoint to DeepSpeed's universal form failed (raised on every rank)."""


def convert_to_universal(path: Path) -> Path:
    """Write ``path/universal``, DeepSpeed's universal form of the tag at ``path`` (in this process).

    Written into a temporary directory beside it and renamed, so a ``universal`` directory is
    always complete; an existing one is reused. Every file read is a weights-only load. Raises
    :class:`UniversalConversionError` with the end of DeepSpeed's output.
    """
    from deepspeed.checkpoint import ds_to_universal

    destination = path / UNIVERSAL
    if destination.is_dir():
        return destination
    staging = path / f".{UNIVERSAL}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    # One worker: DeepSpeed's process pool would fork a process that holds the process group.
    # inject_missing_state: lxtrain's models carry no universal_checkpoint_info (no tensor or
    # pipeline parallelism, so the minimal version record is all the conversion needs).
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(staging),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    output = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal.main(args)
        os.replace(staging, destination)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        tail = " | ".join(line for line in output.getvalue().splitlines()[-5:] if line.strip())
        raise UniversalConversionError(
            f"{type(error).__name__}: {error}" + (f" (DeepSpeed's last output: {tail})" if tail else "")
        ) from error
    finally:
        # ds_to_universal points a 'latest_universal' file beside its output at it; lxtrain
        # names its tags itself, and the pointer would name the temporary directory.
        (path / "latest_universal").unlink(missing_ok=True)
    logger.debug("%s: universal conversion output:\n%s", path, output.getvalue())
    return destination


def _ensure_universal(path: Path, saved_world: int | None, world: int) -> Path:
    """Rank 0 converts the tag (unless done before) while the others wait; all ranks learn the outcome."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    failure = None
    if rank == 0:
        try:
            convert_to_universal(path)
        except Exception as error:  # every rank must hear of it, or the others wait forever
            failure = str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        message = [failure]
        dist.broadcast_object_list(message, src=0, group=distributed.control_group())
        failure = message[0]
    if failure is not None:
        raise UniversalConversionError(
            f"{path}: the checkpoint was written on {saved_world} DP rank(s) and this run has {world}; "
            f"converting it to DeepSpeed's universal form in {path / UNIVERSAL} failed: {failure}. Fix: "
            f"resume on {saved_world} rank(s) (no conversion needed), or make {path} writable and rerun, or "
            f"convert it yourself (python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} "
            f"--output_folder {path / UNIVERSAL} --inject_missing_state --num_extract_workers 1 "
            "--num_merge_workers 1) and rerun; --resume none starts afresh"
        )
    return path / UNIVERSAL


def _load_universal(engine: Any, universal: Path) -> Any:
    """Load a universal checkpoint through DeepSpeed's switch (``checkpoint.load_universal``),
    turned on for this load only: the config's value decides how the engine reads checkpoints."""
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        loaded, _ = engine.load_checkpoint(
            str(universal.parent),
            tag=universal.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    finally:
        config.load_universal_checkpoint = previous
    return loaded


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes (beyond tensors and containers) in DeepSpeed's ZeRO 1-3 optimizer states:
    plain data holders whose unpickling sets attributes and runs no code of their own."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def _deepspeed_globals_allowed() -> Iterator[None]:
    """DeepSpeed's state classes allowed in weights-only loads, re-entrantly.

    ``torch.serialization.safe_globals`` removes its classes on exit even when an enclosing block
    had added them, so a nested use (a :func:`safe_torch_load` inside :func:`weights_only_loads`)
    would leave the rest of the enclosing block without them. Only the missing ones are added
    here, and only those are removed.
    """
    present = set(map(id, torch.serialization.get_safe_globals()))
    missing = [cls for cls in _deepspeed_checkpoint_globals() if id(cls) not in present]
    with torch.serialization.safe_globals(missing):
        yield


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` restricted to tensors, containers and DeepSpeed's state classes.

    Raises :class:`UnsafeCheckpointError` naming the file when its pickle asks for anything else
    (which is when a crafted file would run code).
    """
    try:
        with _deepspeed_globals_allowed():
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
        with _deepspeed_globals_allowed():
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


def fp32_state_dict(directory: Path, tag: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The fp32 weights of a (ZeRO-partitioned) checkpoint, consolidated in memory.

    The one place lxtrain consolidates ZeRO checkpoints (export, fine-tuning's ``--init`` and
    export). Only keys under ``prefix`` are kept, with the prefix removed (the objectives hold the
    network as ``.model``; ``prefix=""`` keeps everything). Every file is read weights-only.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():  # never unpickle code from the checkpoint
        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return {
        key[len(prefix) :]: tensor.float().contiguous()
        for key, tensor in consolidated.items()
        if key.startswith(prefix)
    }


def export_fp32(directory: Path, tag: str, destination: Path, model_config, prefix: str = "model.") -> Path:
    """Consolidate a (ZeRO-partitioned) checkpoint into fp32 weights in lxtrain format (rank 0 only)."""
    from lxtrain.convert import write_lxtrain

    state = fp32_state_dict(directory, tag, prefix)
    temporary = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    write_lxtrain(state, model_config, temporary)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(temporary, destination)
    return destination
