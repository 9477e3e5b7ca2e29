"""Checks that every rank of a Slurm job reaches every other one before a long job is queued.

Run through the same launcher as pre-training, so it tests the same environment (master address,
port, socket interface) without DeepSpeed, data or model:

    LXTRAIN_OUTPUT_DIR=runs/check LXTRAIN_SCRIPT=slurm/allreduce_check.py \
        sbatch --nodes=2 --ntasks-per-node=1 --wait slurm/pretrain.sbatch

Each rank prints one line ``allreduce-check rank=R world=W node=N ifname=I addr=A sum=S ok=True``;
the exit status is non-zero on any rank whose sum is wrong. Arguments meant for pretrain.py are
accepted and ignored.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="bound on rendezvous and collectives")
    args, _ = parser.parse_known_args()

    rank = int(os.environ["SLURM_PROCID"])
    world = int(os.environ["SLURM_NTASKS"])
    dist.init_process_group(
        "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout_s),
    )
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    addr = dict(pair.split("=", 1) for pair in os.environ.get("LXTRAIN_NODE_ADDRS", "").split(",") if pair)
    ok = value.item() == expected
    print(
        f"allreduce-check rank={rank} world={world} node={node} ifname={ifname} "
        f"addr={addr.get(node, '')} sum={value.item():g} ok={ok}",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
