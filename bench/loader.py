"""Data-path benchmark: conversion speed, loader throughput per core, and peak RSS vs data size.

    python bench/loader.py                      # ~3 minutes on the 2-core dev box
    python bench/loader.py --images 300 --scale 4 --feature-dim 256   # a quick smoke run

Prints:
  * conversion: images/s of ``make_shards`` (TSV + JSON -> shards) with ``--workers`` processes;
  * loader: examples/s from shards to collated batches (B x 36 x 2048 features, masking draws,
    tokenisation) per core, i.e. examples per CPU-second of the processes doing the work (this
    process and its data-loader workers, read from the live processes between the first and the
    last batch measured, so worker start-up and shutdown are left out), which stays meaningful
    on a shared, loaded machine; wall-clock rates are printed too; in-process (one core) and
    through a PyTorch DataLoader with ``--workers`` workers, with the shared-memory ring (the
    default) and without it (``shared_buffers=False``);
  * bytes per batch leaving the loader (what crosses to the training device), and what the
    objectives read once object masking has been applied there;
  * peak RSS per rank (the rank process plus its data-loader workers) for one epoch over the
    data at 1x and ``--scale`` x, and their ratio (flat = memory bounded by the buffer).

Every measurement runs in a fresh child process so that RSS and CPU time are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def _cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (data-loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tree_cpu_seconds() -> float:
    """CPU time so far of this process and of its live children (the data-loader workers).

    Read from the live processes, so a difference of two readings covers exactly the interval
    between them: RUSAGE_CHILDREN only counts children once they are reaped, i.e. their whole
    life, start-up (buffer fill) and the batches prefetched before shutdown included.
    """
    import psutil

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _bytes(batch: dict) -> int:
    return sum(value.nbytes for value in batch.values() if hasattr(value, "nbytes"))


def child_epoch(args: argparse.Namespace) -> None:
    """Run one epoch in this (child) process and print a JSON line of measurements."""
    import torch

    from lxtrain.batch import to_device
    from lxtrain.data.loader import build_pretrain_loader

    torch.set_num_threads(1)  # what a data-loader worker runs with
    loader = build_pretrain_loader(
        args.shards,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        buffer_images=args.buffer_images,
        shared_buffers={"default": None, "on": True, "off": False}[args.ring],
        seed=0,
    )
    examples = 0
    first_batch_at = None
    shipped_bytes = device_bytes = 0
    started_wall = time.perf_counter()
    iterator = iter(loader)
    for number, batch in enumerate(iterator):
        if number == args.max_batches:
            break
        if first_batch_at is None:
            # Start the clocks after the first batch: worker start-up and buffer fill are
            # one-off costs per epoch, reported separately.
            first_batch_at = time.perf_counter() - started_wall
            shipped_bytes = _bytes(batch)
            device_bytes = _bytes(to_device(batch, torch.device("cpu")))  # masks applied
            started_wall, started_cpu = time.perf_counter(), _tree_cpu_seconds()
            continue
        examples += len(batch["input_ids"])
    wall = time.perf_counter() - started_wall
    cpu = _tree_cpu_seconds() - started_cpu if first_batch_at is not None else 0.0
    del iterator  # joins the workers
    print(
        json.dumps(
            {
                "examples": examples,
                "wall_s": wall,
                "cpu_s": cpu,
                "first_batch_s": first_batch_at,
                "batches": len(loader),
                "shipped_bytes": shipped_bytes,
                "device_bytes": device_bytes,
                "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _run_child(
    shards: Path,
    args: argparse.Namespace,
    num_workers: int,
    ring: str,
    batch: int,
    buffer: int,
    max_batches: int = -1,
) -> dict:
    """Run child_epoch in a subprocess, sampling the RSS of its process tree."""
    import psutil

    command = [sys.executable, __file__, "--child", str(shards), "--num-workers", str(num_workers)]
    command += ["--batch-size", str(batch), "--buffer-images", str(buffer), "--max-batches", str(max_batches)]
    command += ["--ring", ring]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    tree = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            members = [tree, *tree.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in members if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"child failed: {command}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def _generate(out: Path, images: int, args: argparse.Namespace, direct: bool) -> float:
    from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate

    world = World(feature_dim=args.feature_dim, boxes=args.boxes)
    started = time.perf_counter()
    generate(
        SyntheticConfig(
            out=out,
            images=images,
            valid_images=1,
            world=world,
            direct=direct,
            shard_size=250,
            workers=args.workers,
        )
    )
    return time.perf_counter() - started


def bench_conversion(root: Path, args: argparse.Namespace) -> dict:
    from lxtrain.data import make_shards
    from lxtrain.synthetic.pretraining import SyntheticConfig, World, write_original_files

    config = SyntheticConfig(
        out=root / "original",
        images=args.convert_images,
        valid_images=1,
        world=World(feature_dim=args.feature_dim, boxes=args.boxes),
    )
    paths = write_original_files(config)
    tsv_mb = paths["train_tsv"].stat().st_size / 2**20
    started_wall, started_cpu = time.perf_counter(), _cpu_seconds()
    index = make_shards.convert(
        make_shards.ConvertConfig(
            tsv=[paths["train_tsv"]],
            json=[paths["train_json"]],
            answers=paths["answers"],
            out=root / "converted",
            shard_size=max(1, args.convert_images // (2 * args.workers)),
            workers=args.workers,
            progress=False,
        )
    )
    wall, cpu = time.perf_counter() - started_wall, _cpu_seconds() - started_cpu
    images = index["totals"]["images"]
    return {"images": images, "tsv_mb": tsv_mb, "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="training images at 1x (default 300)")
    parser.add_argument("--scale", type=int, default=8, help="the larger corpus is this many times 1x")
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the throughput runs")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers / conversion processes")
    parser.add_argument("--convert-images", type=int, default=200, help="images in the conversion benchmark")
    parser.add_argument("--throughput-batches", type=int, default=50, help="batches per throughput run")
    parser.add_argument("--rss-batch-size", type=int, default=128, help="batch size of the RSS runs")
    parser.add_argument("--rss-buffer-images", type=int, default=128, help="buffer of the RSS runs")
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--buffer-images", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--ring", choices=("default", "on", "off"), default="default", help=argparse.SUPPRESS)
    parser.add_argument("--max-batches", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.shards = args.child
        child_epoch(args)
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="lxtrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; features "
            f"{args.boxes} x {args.feature_dim}; python {sys.version.split()[0]}"
        )
        conversion = bench_conversion(root, args)
        print(
            f"conversion: {conversion['images']} images ({conversion['tsv_mb']:.0f} MB TSV) with "
            f"{args.workers} processes: {conversion['images'] / conversion['wall_s']:.0f} images/s wall, "
            f"{conversion['images'] / conversion['cpu_s']:.0f} images/s per core"
        )
        small, large = root / "x1", root / f"x{args.scale}"
        seconds = _generate(small, args.images, args, direct=True)
        seconds += _generate(large, args.images * args.scale, args, direct=True)
        print(f"synthetic corpora (1x = {args.images} images, {args.scale}x) generated in {seconds:.0f} s")

        runs = [
            ("in-process, 1 core", 0, "default"),
            (f"{args.workers} workers (default: shared-memory ring)", args.workers, "default"),
            (f"{args.workers} workers, shared_buffers=False", args.workers, "off"),
        ]
        for label, workers, ring in runs:
            # The larger corpus, so that the 1,024-image buffers fill and the run is long enough
            # to amortise worker start-up; stopped after --throughput-batches batches.
            result = _run_child(
                large / "shards" / "train",
                args,
                workers,
                ring,
                args.batch_size,
                1024,
                args.throughput_batches,
            )
            if workers == 0:
                print(
                    f"bytes per batch of {args.batch_size} leaving the loader: "
                    f"{result['shipped_bytes'] / 2**20:.1f} MiB; read by the objectives once the "
                    f"object masks are applied on the device: {result['device_bytes'] / 2**20:.1f} MiB"
                )
            print(
                f"loader {label}: {result['examples'] / result['cpu_s']:.0f} examples/s per core, "
                f"{result['examples'] / result['wall_s']:.0f} examples/s wall (batch {args.batch_size}, "
                f"{result['examples']} examples after the first batch, first batch after "
                f"{result['first_batch_s']:.1f} s)"
            )
        peaks = {}
        for label, corpus in (("1x", small), (f"{args.scale}x", large)):
            result = _run_child(
                corpus / "shards" / "train",
                args,
                args.workers,
                "default",
                args.rss_batch_size,
                args.rss_buffer_images,
            )
            peaks[label] = result["peak_rss_mb"]
            print(
                f"peak RSS per rank, {label} data ({result['batches']} batches of {args.rss_batch_size}, "
                f"buffer {args.rss_buffer_images} images/stream, one stream per worker at 1 rank, {args.workers} workers): "
                f"{result['peak_rss_mb']:.0f} MB"
            )
        ratio = peaks[f"{args.scale}x"] / peaks["1x"]
        print(f"peak RSS ratio {args.scale}x / 1x: {ratio:.2f} (goal <= 1.1)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
