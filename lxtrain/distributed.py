"""Rank discovery and process-group set-up for every launcher lxtrain supports.

One entry point runs under the ``deepspeed`` launcher and ``torchrun`` (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment), under ``srun`` (SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT exported by the sbatch script), under
``mpirun`` (Open MPI's OMPI_COMM_WORLD_* variables; the master address comes from mpi4py), or as a
plain single process. The launcher's variables are translated into the torch.distributed ones
before the process group starts, so everything after initialisation is launcher-agnostic.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "env" (deepspeed/torchrun), "slurm", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_master_address() -> str:
    """Rank 0's host name, shared with every MPI rank (mpi4py is imported only under mpirun)."""
    import socket

    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def discover(environ: dict[str, str] | None = None) -> DistributedInfo:
    """Find rank, world size and local rank from the launcher, and fill in the torch.distributed env.

    Precedence: explicit torch.distributed variables (deepspeed / torchrun) > Slurm > Open MPI > single.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistributedInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        info = DistributedInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm"
        )
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "running under srun but MASTER_ADDR is not set: launch through slurm/pretrain.sbatch, "
                "which exports MASTER_ADDR and MASTER_PORT from the job's node list"
            )
    elif "OMPI_COMM_WORLD_RANK" in env:
        info = DistributedInfo(
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env["OMPI_COMM_WORLD_SIZE"]),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            "mpi",
        )
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _mpi_master_address()
    else:
        info = DistributedInfo(0, 1, 0, "single")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = (
        str(info.rank),
        str(info.world_size),
        str(info.local_rank),
    )
    return info


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


# Set by init(): the bound on every collective, and the gloo group of control_group().
_collective_timeout = datetime.timedelta(seconds=300)
_control_group: dist.ProcessGroup | None = None


def init(timeout_s: float = 300.0, info: DistributedInfo | None = None) -> DistributedInfo:
    """Discover the launcher and start the process group (gloo on CPU, nccl on GPUs).

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail within it
    instead of hanging forever. ``info``: what :func:`discover` already returned, if it was called.
    """
    global _collective_timeout
    _collective_timeout = datetime.timedelta(seconds=timeout_s)
    # discover() fills in RANK/WORLD_SIZE: a second call would then name the launcher "env".
    info = info or discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(
            dist_backend=backend(),
            auto_mpi_discovery=False,
            timeout=_collective_timeout,
            rank=info.rank,
            world_size=info.world_size,
        )
    return info


def control_group() -> dist.ProcessGroup:
    """A gloo group over all ranks for per-step control flags (stop requested, ...).

    A flag exchanged through NCCL would go through the GPU and make the host wait for the compute
    queued before it; over gloo it is a few bytes between CPUs. Created on the first call, which
    every rank makes at the same point (creating a group is itself a collective).
    """
    global _control_group
    if _control_group is None:
        if dist.get_backend() == "gloo":
            _control_group = dist.group.WORLD
        else:
            _control_group = dist.new_group(backend="gloo", timeout=_collective_timeout)
    return _control_group


def any_rank(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on some rank; a CPU collective (none at world size 1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return bool(value[0])


def print0(*args: object, **kwargs: object) -> None:
    """Print on rank 0 only (or always, before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def fail_all(message: str) -> None:
    """Report a fatal error on this rank and exit non-zero without waiting on the other ranks."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(1)


# What gloo's and NCCL's transports say when a peer is gone or silent (they raise plain RuntimeErrors).
_PEER_TIMEOUT_SIGNS = ("Timed out waiting", "timed out", "Timeout", "watchdog")
_PEER_GONE_SIGNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
)


def is_lost_peer_error(error: BaseException) -> bool:
    """True when ``error`` comes from a collective whose peer died, hangs or cannot be reached."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    markers = ("gloo", "NCCL", "ProcessGroup") + _PEER_GONE_SIGNS
    return isinstance(error, RuntimeError) and any(marker in text for marker in markers)


def lost_peer_message(error: BaseException, where: str) -> str:
    """A one-paragraph diagnosis of a failed collective: which rank, the likely cause, what to do."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(sign in text for sign in _PEER_TIMEOUT_SIGNS):
        cause = (
            "another rank did not answer within the collective timeout (--collective-timeout-s): "
            "the network between the nodes is cut or a rank hangs"
        )
    elif any(sign in text for sign in _PEER_GONE_SIGNS):
        cause = "the connection to another rank broke: that rank has most likely died (see its log)"
    else:
        cause = "a collective failed"
    return (
        f"rank {rank}: lost contact with another rank {where}: {cause} ({text}). "
        "Fix the cause and rerun with --resume auto to continue from the last complete checkpoint."
    )


def collective_device() -> torch.device:
    """Where the process group's collectives run: NCCL moves CUDA tensors only, gloo CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _in_place_on_collective_device(
    tensor: torch.Tensor, collective: Callable[[torch.Tensor], object]
) -> torch.Tensor:
    """Run ``collective`` on a CPU tensor, through the GPU under NCCL, and leave the result in ``tensor``."""
    device = collective_device()
    if device.type == "cpu":
        collective(tensor)
        return tensor
    on_device = tensor.to(device)
    collective(on_device)
    return tensor.copy_(on_device.cpu())


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a CPU tensor in place on any backend (a collective: call it on all ranks).

    The control-plane tensors here (step flags, metric sums) live on the CPU; under NCCL they make
    the round trip through the GPU, a few bytes.
    """
    return _in_place_on_collective_device(tensor, lambda t: dist.all_reduce(t, op=op))


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Broadcast a CPU tensor in place from rank ``src`` on any backend (a collective)."""
    return _in_place_on_collective_device(tensor, lambda t: dist.broadcast(t, src=src))


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (a collective: call it on all ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int32)
    all_reduce_(value, op=dist.ReduceOp.MAX)
    return int(value.item()) == 0


def equal_count_batches(
    batches: Iterable[Any],
    available: int,
    max_batches: int | None = None,
    fallback: Callable[[], Any] | None = None,
) -> Iterator[tuple[Any, bool]]:
    """(batch, counted) pairs, the same number on every rank (a collective: call it on all ranks).

    Evaluation splits rarely divide evenly over ranks, but under ZeRO-3 every forward is a
    collective, so a rank that ran out would leave the others waiting: shorter ranks repeat their
    last batch with ``counted=False`` (excluded from metrics). A rank with no batch at all forwards
    ``fallback()`` instead, and without one it is an error rather than a hang.
    """
    local = available if max_batches is None else min(available, max_batches)
    count = torch.tensor([local], dtype=torch.int64)
    if dist.is_initialized():
        all_reduce_(count, op=dist.ReduceOp.MAX)
    last = None
    for index, batch in enumerate(batches):
        if index >= local:
            break
        last = batch
        yield batch, True
    for _ in range(int(count) - local):
        if last is None:
            if fallback is None:
                raise RuntimeError(
                    f"rank {dist.get_rank()} has no evaluation batch while others have {int(count)}: "
                    "use fewer ranks or data-loader workers, or a larger split"
                )
            last = fallback()
        yield last, False
