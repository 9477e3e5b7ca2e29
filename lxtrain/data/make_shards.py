"""Convert the published obj36 TSV + sentence JSON + answer table into feature shards.

    python -m lxtrain.data.make_shards --tsv train2014_obj36.tsv val2014_obj36.tsv \\
        --json mscoco_train.json mscoco_nominival.json vgnococo.json \\
        --answers all_ans.json --out shards/train --name train --workers 8

Each TSV file is cut into byte ranges of about ``--shard-size`` lines (lines of one file have
nearly the same length, so no pre-scan is needed); one range becomes one tar shard
``NAME-000123.tar``, numbered in input order. Ranges are converted by a process pool, and under
``mpirun`` every MPI rank takes a disjoint, round-robin subset of the ranges; rank 0 then writes
``index.json``. Shards are written under a temporary name and renamed when complete.

Bad input (a TSV line with the wrong column count, bad base64 or shapes that disagree with
``num_boxes``; a JSON record without ``img_id``/``sentf``; sentences whose image has no
features) is reported with file and line/record, counted in ``index.json`` under ``dropped``,
and skipped; ``--strict`` stops at the first one.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxtrain.batch import QA_SOURCE_NAMES, SENTENCE_SOURCE_NAMES
from lxtrain.data.answers import AnswerTable, load_answer_table
from lxtrain.data.index import write_index
from lxtrain.data.obj36 import TsvLineError, parse_line
from lxtrain.data.problems import MAX_KEPT_MESSAGES, DataError, ProblemLog
from lxtrain.data.sentences import load_sentences
from lxtrain.data.shard_format import INDEX_FORMAT, ShardWriter, encode_sample


@dataclass
class ConvertConfig:
    """Options of one conversion (the CLI flags).

    Attributes:
        tsv: obj36 region-feature TSV files.
        json: sentence JSON files; records of one image in several files are merged.
        answers: ``all_ans.json``.
        out: output directory for shards and ``index.json``.
        name: shard name prefix (``NAME-000000.tar``).
        shard_size: images per shard, approximately: each TSV file is cut into equal byte ranges
            of at most about this many lines, so shards of one file differ by a few images.
        workers: conversion processes on this machine (per MPI rank under mpirun).
        qa_sets: QA datasets whose answers and labels are kept (the reference's filter).
        strict: stop at the first bad input instead of counting it.
        overwrite: replace existing shards of the same name in ``out``.
        progress: show a tqdm progress bar.
    """

    tsv: list[Path]
    json: list[Path]
    answers: Path
    out: Path
    name: str = "train"
    shard_size: int = 1000
    workers: int = 1
    qa_sets: tuple[str, ...] = QA_SOURCE_NAMES
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.tsv = [Path(p) for p in self.tsv]
        self.json = [Path(p) for p in self.json]
        self.answers, self.out = Path(self.answers), Path(self.out)
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("shard_size and workers must be >= 1")
        unknown = set(self.qa_sets) - set(QA_SOURCE_NAMES)
        if unknown:
            raise ValueError(f"unknown QA sets {sorted(unknown)}; choose from {QA_SOURCE_NAMES}")
        for path in [*self.tsv, *self.json, self.answers]:
            if not path.is_file():
                raise FileNotFoundError(f"input file not found: {path}")
        if not self.tsv or not self.json:
            raise ValueError("need at least one --tsv and one --json file")


@dataclass
class _ShardTask:
    index: int
    tsv: Path
    start: int
    end: int


@dataclass
class ShardResult:
    """What one converted shard holds (and what its input range dropped)."""

    index: int
    name: str | None  # None when no image survived
    images: int = 0
    sentences: int = 0
    sources: Counter = field(default_factory=Counter)
    qa_labelled: int = 0
    sentences_per_image: list[int] = field(default_factory=list)
    img_ids: list[str] = field(default_factory=list)
    no_sentence_images: int = 0
    # (reason, tsv path, byte offset of the line, detail): resolved to line numbers by rank 0.
    line_problems: list[tuple[str, str, int, str]] = field(default_factory=list)
    line_problem_counts: Counter = field(default_factory=Counter)
    failed: bool = False
    error: str = ""

    def add_image(self, sentences: Sequence[dict]) -> None:
        """Count one written image and its sentences."""
        self.images += 1
        self.sentences += len(sentences)
        self.sentences_per_image.append(len(sentences))
        self.sources.update(s["source"] for s in sentences)
        self.qa_labelled += sum(1 for s in sentences if s["answer_ids"])


# Set before the worker pool forks, so workers share the (large) sentence dict copy-on-write.
_STATE: dict = {}


def _plan_tasks(tsv_paths: Sequence[Path], shard_size: int) -> list[_ShardTask]:
    """Cut every TSV into byte ranges of about ``shard_size`` lines (one shard each)."""
    tasks: list[_ShardTask] = []
    for path in tsv_paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as handle:
            line_bytes = max(len(handle.readline()), 1)
        count = max(1, math.ceil(size / (line_bytes * shard_size)))
        bounds = [size * i // count for i in range(count + 1)]
        tasks.extend(_ShardTask(len(tasks), path, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False))
    return tasks


def _probe_shapes(tsv_paths: Sequence[Path], max_lines: int = 100) -> tuple[int, int]:
    """(boxes per image, feature dim) from the first parsable line: every image must match it."""
    for path in tsv_paths:
        with open(path, "rb") as handle:
            for _, line in zip(range(max_lines), handle, strict=False):
                try:
                    regions = parse_line(line)
                except TsvLineError:
                    continue
                return regions.num_boxes, regions.features.shape[1]
    raise DataError(f"no parsable line in the first {max_lines} lines of {[str(p) for p in tsv_paths]}")


def _iter_lines(path: Path, start: int, end: int):
    """Yield ``(byte offset, line)`` for lines that *start* in ``[start, end)``."""
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the line holding byte start-1 belongs to the previous range
        offset = handle.tell()
        while offset < end:
            line = handle.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


def _convert_shard(task: _ShardTask) -> ShardResult:
    """Convert one byte range of one TSV file into one shard (runs in a worker)."""
    config: ConvertConfig = _STATE["config"]
    by_image: dict[str, list[dict]] = _STATE["sentences"]
    num_boxes, feature_dim = _STATE["shapes"]
    name = f"{config.name}-{task.index:06d}.tar"
    result = ShardResult(index=task.index, name=name)
    writer = ShardWriter(config.out / name)
    try:
        for offset, line in _iter_lines(task.tsv, task.start, task.end):
            if not line.strip():
                continue
            try:
                regions = parse_line(line)
                if regions.num_boxes != num_boxes or regions.features.shape[1] != feature_dim:
                    raise TsvLineError(
                        f"shape ({regions.num_boxes}, {regions.features.shape[1]}) differs from the "
                        f"dataset's ({num_boxes}, {feature_dim})",
                        "tsv_shape",
                    )
            except TsvLineError as error:
                result.line_problem_counts[error.reason] += 1
                if len(result.line_problems) < 20:
                    result.line_problems.append((error.reason, str(task.tsv), offset, str(error)))
                if config.strict:
                    result.failed = True
                    break
                continue
            sentences = by_image.get(regions.img_id)
            result.img_ids.append(regions.img_id)
            if not sentences:
                result.no_sentence_images += 1
                continue
            writer.write(encode_sample(regions, sentences))
            result.add_image(sentences)
    except Exception as error:  # reported to rank 0 so no MPI rank is left waiting in gather
        writer.abort()
        result.failed, result.error, result.name = True, f"{task.tsv}: {error!r}", None
        return result
    if result.images and not result.failed:
        writer.close()
    else:
        writer.abort()
        result.name = None
    return result


def _line_numbers(path: str, offsets: Sequence[int]) -> dict[int, int]:
    """1-based line number of each byte offset, by counting newlines (only run on errors)."""
    numbers: dict[int, int] = {}
    wanted = sorted(set(offsets))
    lines_before, position = 0, 0
    with open(path, "rb") as handle:
        for offset in wanted:
            while position < offset:
                chunk = handle.read(min(1 << 24, offset - position))
                if not chunk:
                    break
                lines_before += chunk.count(b"\n")
                position += len(chunk)
            numbers[offset] = lines_before + 1
    return numbers


def _mpi_comm():
    """The MPI world communicator when launched by mpirun/srun with MPI, else None.

    mpi4py is only imported under an MPI launcher: importing it initialises MPI, which is slow
    and fails on machines without an MPI runtime.
    """
    markers = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if not any(marker in os.environ for marker in markers):
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def _run_tasks(tasks: list[_ShardTask], config: ConvertConfig, show: bool) -> list[ShardResult]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="shard", disable=not show, desc=f"converting {config.name}")
    results: list[ShardResult] = []
    images = 0

    def record(result: ShardResult) -> bool:
        nonlocal images
        results.append(result)
        images += result.images
        bar.update(1)
        bar.set_postfix(images=images)
        return result.failed

    if config.workers == 1 or len(tasks) <= 1:
        for task in tasks:
            if record(_convert_shard(task)):
                break
    else:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(config.workers, len(tasks))) as pool:
            for result in pool.imap_unordered(_convert_shard, tasks):
                if record(result):
                    pool.terminate()
                    break
    bar.close()
    return results


def _merge(
    config: ConvertConfig,
    results: list[ShardResult],
    problems: ProblemLog,
    by_image: dict[str, list[dict]],
    table: AnswerTable,
    shapes: tuple[int, int],
    seconds: float,
) -> dict:
    """Build ``index.json`` from every rank's shard results; raise on a strict-mode failure."""
    results = sorted(results, key=lambda r: r.index)
    failures = [r for r in results if r.failed]
    line_problems = [p for r in results for p in r.line_problems]
    line_numbers: dict[tuple[str, int], int] = {}
    for path in {p[1] for p in line_problems}:
        numbers = _line_numbers(path, [p[2] for p in line_problems if p[1] == path])
        line_numbers.update({(path, offset): line for offset, line in numbers.items()})
    messages = [
        (reason, f"{path}:{line_numbers[(path, offset)]}: {detail}")
        for reason, path, offset, detail in sorted(line_problems, key=lambda p: (p[1], p[2]))
    ]
    if failures:
        first = next((m for _, m in messages), None) or failures[0].error
        raise DataError(first)
    counts = Counter()
    for result in results:
        counts.update(result.line_problem_counts)
    problems.counts.update(counts)
    problems.messages.extend(message for _, message in messages)
    del problems.messages[MAX_KEPT_MESSAGES:]

    seen: Counter = Counter(img_id for r in results for img_id in r.img_ids)
    duplicates = [img_id for img_id, n in seen.items() if n > 1]
    if duplicates:
        # Both copies stay in the shards (removing one would need a second pass); say so loudly.
        problems.add(
            "duplicate_image", f"{len(duplicates)} image(s) appear in several TSV lines, e.g. {duplicates[0]}"
        )
    missing = [img_id for img_id in by_image if img_id not in seen]
    for img_id in missing[:5]:
        problems.add(
            "no_features", f"image {img_id}: {len(by_image[img_id])} sentence(s) but no TSV features", 0
        )
    if missing:
        problems.counts["no_features"] += sum(len(by_image[i]) for i in missing)
    no_sentences = sum(r.no_sentence_images for r in results)
    if no_sentences:
        problems.counts["image_without_sentences"] += no_sentences

    inputs = {"tsv": [str(p) for p in config.tsv], "json": [str(p) for p in config.json]}
    return build_index(config.name, results, problems, table, config.qa_sets, shapes, inputs, seconds)


def build_index(
    name: str,
    results: Sequence[ShardResult],
    problems: ProblemLog,
    table: AnswerTable,
    qa_sets: Sequence[str],
    shapes: tuple[int, int],
    inputs: dict,
    seconds: float,
) -> dict:
    """The ``index.json`` document: per-shard and total counts, dropped items, answer table.

    ``sentences_per_image`` lets the loader split an epoch into equal per-rank, per-worker
    parts at sentence granularity without opening a shard.
    """
    shards = [
        {
            "name": r.name,
            "images": r.images,
            "sentences": r.sentences,
            "sources": dict(sorted(r.sources.items())),
            "qa_labelled": r.qa_labelled,
            "sentences_per_image": r.sentences_per_image,
        }
        for r in sorted(results, key=lambda r: r.index)
        if r.name is not None
    ]
    sources = Counter()
    for shard in shards:
        sources.update(shard["sources"])
    totals = {
        "shards": len(shards),
        "images": sum(s["images"] for s in shards),
        "sentences": sum(s["sentences"] for s in shards),
        "sources": {source: sources.get(source, 0) for source in SENTENCE_SOURCE_NAMES},
        "qa_labelled": sum(s["qa_labelled"] for s in shards),
    }
    return {
        "format": INDEX_FORMAT,
        "name": name,
        "boxes_per_image": shapes[0],
        "feature_dim": shapes[1],
        "feature_dtype": "float16",
        "answers": {
            "sha256": table.source_sha256,
            "qa_sets": list(qa_sets),
            "count": len(table),
            "list": table.answers,
        },
        "inputs": inputs,
        "totals": totals,
        "dropped": problems.to_json(),
        "seconds": round(seconds, 2),
        "shards": shards,
    }


def _prepare_out(config: ConvertConfig) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    old = sorted(config.out.glob(f"{config.name}-*.tar"))
    if old and not config.overwrite:
        raise FileExistsError(f"{config.out} already holds {config.name}-*.tar shards; pass --overwrite")
    for path in old:
        path.unlink()


def convert(config: ConvertConfig) -> dict | None:
    """Run a conversion; returns the index on rank 0 (and without MPI), None on other ranks."""
    started = time.perf_counter()
    comm = _mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    problems = ProblemLog(strict=config.strict)
    table = load_answer_table(config.answers, config.qa_sets)
    by_image = load_sentences(config.json, table, problems, config.qa_sets)
    shapes = _probe_shapes(config.tsv)
    if rank == 0:
        _prepare_out(config)
    if comm is not None:
        comm.Barrier()
    tasks = _plan_tasks(config.tsv, config.shard_size)
    _STATE.update(config=config, sentences=by_image, shapes=shapes)
    results = _run_tasks(tasks[rank::world], config, show=config.progress and rank == 0)
    if comm is not None:
        gathered = comm.gather(results, root=0)
        results = [r for part in gathered for r in part] if rank == 0 else []
    error = None
    index = None
    if rank == 0:
        try:
            index = _merge(config, results, problems, by_image, table, shapes, time.perf_counter() - started)
            write_index(index, config.out)
        except DataError as failure:
            error = str(failure)
    if comm is not None:
        error = comm.bcast(error, root=0)
    if error is not None:
        raise DataError(error)
    return index


def summary(index: dict) -> str:
    """Human-readable end-of-conversion summary."""
    totals, dropped = index["totals"], index["dropped"]
    rate = totals["images"] / max(index["seconds"], 1e-9)
    lines = [
        f"wrote {totals['shards']} shard(s) '{index['name']}': {totals['images']} images, "
        f"{totals['sentences']} sentences ({totals['qa_labelled']} with QA labels) in {index['seconds']:.1f} s "
        f"({rate:.0f} images/s)",
        "sentences per source: " + ", ".join(f"{k} {v}" for k, v in totals["sources"].items()),
        f"features: {index['boxes_per_image']} boxes x {index['feature_dim']} (float16); "
        f"answer table: {index['answers']['count']} answers",
    ]
    if dropped["counts"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in dropped["counts"].items()))
        lines.extend(f"  {message}" for message in dropped["first_messages"][:10])
    else:
        lines.append("dropped: nothing")
    return "\n".join(lines)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lxtrain.data.make_shards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tsv", nargs="+", required=True, type=Path, help="obj36 feature TSV file(s)")
    parser.add_argument("--json", nargs="+", required=True, type=Path, help="sentence JSON file(s)")
    parser.add_argument("--answers", required=True, type=Path, help="all_ans.json")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--name", default="train", help="shard name prefix (default: train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes")
    parser.add_argument(
        "--qa-sets", default=",".join(QA_SOURCE_NAMES), help="comma-separated QA datasets to keep"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = ConvertConfig(
            tsv=args.tsv,
            json=args.json,
            answers=args.answers,
            out=args.out,
            name=args.name,
            shard_size=args.shard_size,
            workers=args.workers,
            qa_sets=tuple(s for s in args.qa_sets.split(",") if s),
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        index = convert(config)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if index is not None:
        print(summary(index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
