"""Fine-tuning shards: the VQA / GQA / NLVR2 JSON plus obj36 features, one *image group* per sample.

    python -m lxtrain.data.finetune_shards --task vqa --json data/vqa/train.json data/vqa/nominival.json \
        --tsv data/mscoco_imgfeat/train2014_obj36.tsv data/mscoco_imgfeat/val2014_obj36.tsv \
        --answers data/vqa/trainval_ans2label.json --out shards/vqa_train

A sample holds the features of its images once and every example that uses them:

- VQA / GQA: one image and all of its questions (features stored once per image, as in
  pre-training, instead of once per question);
- NLVR2: one image *pair* (img0, img1) and every statement about that pair.

Members of sample ``000042`` (``K`` = 1 image for VQA/GQA, 2 for NLVR2)::

    000042.features{k}.npy   (O, D) float16   RoI features of image k
    000042.boxes{k}.npy      (O, 4) float32   x1, y1, x2, y2 in pixels
    000042.json              {"images": [{"img_id", "img_h", "img_w"}, ...],
                              "examples": [{"id", "text", "labelled", "answer_ids", "answer_scores",
                                            "answer_type", "label"}, ...]}

``answer_ids``/``answer_scores`` are the label mapped onto the task's answer table (VQA/GQA);
``label`` is 0/1 (NLVR2). ``labelled`` is false for test splits. ``index.json`` next to the
shards records the task, the answer table, per-sample example counts (for the loader's per-rank
split) and every dropped item by reason. No pickle anywhere: npy and json members only.

Bad input is counted, never fatal: a question whose image has no features is dropped
(``no_features``); label answers outside the answer table are dropped from the label
(``label_outside_table``; the question stays, as in the reference, with what is left);
malformed records are dropped (``bad_record``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxtrain.data.answers import AnswerTable
from lxtrain.data.index import ShardIndex, open_shard_set, shard_infos, write_index
from lxtrain.data.obj36 import RegionFeatures, TsvLineError, parse_line
from lxtrain.data.problems import ProblemLog
from lxtrain.data.shard_format import (
    CorruptSampleError,
    ShardWriter,
    iter_shard,
    load_npy,
    npy_bytes,
    sample_key,
)

FINETUNE_INDEX_FORMAT = "lxtrain-finetune/1"
TASKS = ("vqa", "gqa", "nlvr2")
IMAGES_PER_SAMPLE = {"vqa": 1, "gqa": 1, "nlvr2": 2}


# ------------------------------------------------------------------------------------------
# Answer tables of the fine-tuning tasks.


def load_task_answers(path: str | Path) -> AnswerTable:
    """Read a task answer table: ``trainval_ans2label.json`` (dict answer -> id), ``*_label2ans.json``
    (list), or the pre-training ``all_ans.json`` (list of ``{"ans"}``)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the answer table ({error})") from None
    if isinstance(raw, dict):
        ids = sorted(raw.values())
        if ids != list(range(len(raw))):
            raise ValueError(f"{path}: ans2label ids must be 0..{len(raw) - 1} without gaps")
        answers = [""] * len(raw)
        for answer, answer_id in raw.items():
            answers[answer_id] = answer
    elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        answers = list(raw)
    elif isinstance(raw, list) and all(isinstance(a, dict) and isinstance(a.get("ans"), str) for a in raw):
        answers = [a["ans"] for a in raw]
    else:
        raise ValueError(f"{path}: expected ans2label (dict), label2ans (list) or all_ans.json records")
    return AnswerTable(answers)


# ------------------------------------------------------------------------------------------
# The task JSON: records grouped into samples.


@dataclass
class Group:
    """The images of one sample and the examples that use them (in input order)."""

    img_ids: tuple[str, ...]
    examples: list[dict]


def _convert_qa(record: dict, where: str, table: AnswerTable, problems: ProblemLog) -> dict | None:
    qid, text = record.get("question_id"), record.get("sent")
    if qid is None or not isinstance(record.get("img_id"), str) or not isinstance(text, str):
        problems.add("bad_record", f"{where}: needs 'question_id', string 'img_id' and 'sent'")
        return None
    label = record.get("label")
    answer_ids: list[int] = []
    answer_scores: list[float] = []
    if label is not None:
        if not isinstance(label, dict):
            problems.add(
                "bad_record", f"{where} (question {qid}): 'label' is not an {{answer: score}} object"
            )
            return None
        answer_ids, answer_scores = table.convert_label(label)
        outside = len(label) - len(answer_ids)
        if outside > 0:
            unknown = [a for a in label if table.lookup(str(a)) is None]
            problems.add(
                "label_outside_table",
                f"{where} (question {qid}): answer(s) {unknown[:3]} not in the answer table, dropped from the label",
                outside,
            )
    return {
        "id": qid,
        "text": text,
        "labelled": label is not None,
        "answer_ids": answer_ids,
        "answer_scores": answer_scores,
        "answer_type": record.get("answer_type"),
        "label": None,
    }


# True/False hash like 1/0, so the booleans are covered by the integer keys.
_NLVR2_LABELS = {0: 0, 1: 1, "False": 0, "True": 1, "false": 0, "true": 1}


def _convert_nlvr2(record: dict, where: str, problems: ProblemLog) -> dict | None:
    identifier, text = record.get("identifier"), record.get("sent")
    if not all(isinstance(record.get(key), str) for key in ("identifier", "img0", "img1", "sent")):
        problems.add("bad_record", f"{where}: needs string 'identifier', 'img0', 'img1' and 'sent'")
        return None
    label = record.get("label")
    if label is not None and (not isinstance(label, int | str) or label not in _NLVR2_LABELS):
        problems.add(
            "label_outside_table", f"{where} ({identifier}): label {label!r} is not 0/1 or True/False"
        )
        return None
    return {
        "id": identifier,
        "text": text,
        "labelled": label is not None,
        "answer_ids": [],
        "answer_scores": [],
        "answer_type": None,
        "label": None if label is None else _NLVR2_LABELS[label],
    }


def read_task_json(
    task: str, paths: Sequence[str | Path], table: AnswerTable | None, problems: ProblemLog
) -> list[Group]:
    """Read and validate the task's JSON files; examples grouped by image (VQA/GQA) or pair (NLVR2)."""
    groups: dict[tuple[str, ...], Group] = {}
    for path in paths:
        try:
            records = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read task JSON ({error})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of {task} records")
        for number, record in enumerate(records):
            where = f"{path}[{number}]"
            if not isinstance(record, dict):
                problems.add("bad_record", f"{where}: not an object")
                continue
            if task == "nlvr2":
                example = _convert_nlvr2(record, where, problems)
                key = (record.get("img0"), record.get("img1"))
            else:
                assert table is not None
                example = _convert_qa(record, where, table, problems)
                key = (record.get("img_id"),)
            if example is not None:
                groups.setdefault(key, Group(key, [])).examples.append(example)
    return list(groups.values())


# ------------------------------------------------------------------------------------------
# Features: random access into obj36 TSV files by image id.


class FeatureStore:
    """img_id -> (file, byte offset) over several obj36 TSVs; lines are parsed on demand.

    The first pass only reads up to the first tab of each line, so opening a 24 GB file costs one
    sequential read and a few MB of offsets rather than the features in memory.
    """

    def __init__(self, paths: Sequence[str | Path], problems: ProblemLog) -> None:
        self.problems = problems
        self.offsets: dict[str, tuple[int, int]] = {}
        self.paths = [Path(p) for p in paths]
        self.handles = [open(p, "rb") for p in self.paths]  # noqa: SIM115 (closed by close())
        for file_number, handle in enumerate(self.handles):
            offset = 0
            for line in handle:
                img_id = line.split(b"\t", 1)[0].decode("ascii", "replace")
                self.offsets.setdefault(img_id, (file_number, offset))
                offset += len(line)

    def get(self, img_id: str) -> RegionFeatures | None:
        """The image's regions, or None (counted) when it has no line or the line is bad."""
        location = self.offsets.get(img_id)
        if location is None:
            return None
        file_number, offset = location
        handle = self.handles[file_number]
        handle.seek(offset)
        try:
            return parse_line(handle.readline())
        except TsvLineError as error:
            self.problems.add(error.reason, f"{self.paths[file_number]} (img_id {img_id}): {error}")
            return None

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


# ------------------------------------------------------------------------------------------
# Writing.


def encode_group(regions: Sequence[RegionFeatures], examples: list[dict]) -> dict[str, bytes]:
    """Member suffix -> bytes of one sample."""
    members: dict[str, bytes] = {}
    for k, image in enumerate(regions):
        members[f"features{k}.npy"] = npy_bytes(image.features.astype(np.float16))
        members[f"boxes{k}.npy"] = npy_bytes(np.asarray(image.boxes, dtype=np.float32))
    header = {
        "images": [{"img_id": r.img_id, "img_h": int(r.img_h), "img_w": int(r.img_w)} for r in regions],
        "examples": examples,
    }
    members["json"] = json.dumps(header, separators=(",", ":")).encode()
    return members


@dataclass
class ConvertTaskConfig:
    """One fine-tuning split to convert.

    Attributes:
        task: vqa | gqa | nlvr2.
        json: the task JSON files of the split (merged).
        tsv: obj36 feature files holding the split's images.
        out: output directory (shards + index.json).
        answers: the task answer table (VQA/GQA; ignored for NLVR2).
        name: shard name prefix (default: the output directory's name).
        shard_size: samples per shard.
    """

    task: str
    json: Sequence[Path]
    tsv: Sequence[Path]
    out: Path
    answers: Path | None = None
    name: str | None = None
    shard_size: int = 500

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {self.task!r}")
        if self.task != "nlvr2" and self.answers is None:
            raise ValueError(f"--task {self.task} needs --answers (the task's answer table)")
        self.out = Path(self.out)
        self.name = self.name or self.out.name


def convert(config: ConvertTaskConfig) -> dict:
    """Convert one split; returns (and writes) its ``index.json`` document."""
    started = time.perf_counter()
    problems = ProblemLog()
    table = load_task_answers(config.answers) if config.task != "nlvr2" else None
    groups = read_task_json(config.task, config.json, table, problems)
    store = FeatureStore(config.tsv, problems)
    config.out.mkdir(parents=True, exist_ok=True)
    for stale in config.out.glob(f"{config.name}-*.tar*"):
        stale.unlink()
    shards: list[dict] = []
    shape: tuple[int, int] | None = None
    writer: ShardWriter | None = None
    counts: list[int] = []
    labelled = 0

    def finish() -> None:
        if writer is not None:
            writer.close()
            shards.append({"name": writer.path.name, "samples": writer.count, "examples_per_sample": counts})

    try:
        for group in groups:
            regions = [store.get(img_id) for img_id in group.img_ids]
            missing = [img_id for img_id, r in zip(group.img_ids, regions, strict=True) if r is None]
            if missing:
                problems.add(
                    "no_features",
                    f"image(s) {missing} have no features in {[str(p) for p in config.tsv]}: "
                    f"{len(group.examples)} example(s) dropped (e.g. {group.examples[0]['id']!r})",
                    len(group.examples),
                )
                continue
            group_shape = regions[0].features.shape
            if shape is None:
                shape = group_shape
            if any(r.features.shape != shape for r in regions):
                problems.add(
                    "box_count",
                    f"image(s) {list(group.img_ids)}: features {[r.features.shape for r in regions]} differ "
                    f"from the split's {shape}; {len(group.examples)} example(s) dropped",
                    len(group.examples),
                )
                continue
            if writer is None or writer.count >= config.shard_size:
                finish()
                writer, counts = ShardWriter(config.out / f"{config.name}-{len(shards):06d}.tar"), []
            writer.write(encode_group(regions, group.examples))
            counts.append(len(group.examples))
            labelled += sum(1 for example in group.examples if example["labelled"])
        finish()
    finally:
        store.close()
    if not shards:
        raise ValueError(
            f"{config.name}: no usable examples (dropped: {dict(problems.counts)}); first problems: "
            f"{problems.messages[:3]}"
        )
    index = {
        "format": FINETUNE_INDEX_FORMAT,
        "task": config.task,
        "name": config.name,
        "images_per_sample": IMAGES_PER_SAMPLE[config.task],
        "boxes_per_image": shape[0],
        "feature_dim": shape[1],
        "feature_dtype": "float16",
        "answers": None if table is None else table.answers,
        "totals": {
            "samples": sum(s["samples"] for s in shards),
            "examples": sum(sum(s["examples_per_sample"]) for s in shards),
            "labelled": labelled,
        },
        "inputs": {"json": [str(p) for p in config.json], "tsv": [str(p) for p in config.tsv]},
        "dropped": problems.to_json(),
        "seconds": round(time.perf_counter() - started, 2),
        "shards": shards,
    }
    write_index(index, config.out)
    return index


# ------------------------------------------------------------------------------------------
# Reading.


@dataclass
class FinetuneSample:
    """One decoded sample: K images (features (O, D) float16, boxes normalised to [0, 1]) and examples."""

    img_ids: list[str]
    features: list[np.ndarray]
    boxes: list[np.ndarray]
    examples: list[dict]


def decode_finetune_sample(members: dict, images: int, where: str) -> FinetuneSample:
    """Decode one sample; boxes come back as (x1/w, y1/h, x2/w, y2/h) clipped to [0, 1] (SPEC 2)."""
    try:
        header = json.loads(members["json"])
        features = [load_npy(members[f"features{k}.npy"]) for k in range(images)]
        boxes = []
        for k, image in enumerate(header["images"][:images]):
            size = np.array([image["img_w"], image["img_h"], image["img_w"], image["img_h"]], np.float32)
            boxes.append(np.clip(load_npy(members[f"boxes{k}.npy"]) / size, 0.0, 1.0).astype(np.float32))
        return FinetuneSample([i["img_id"] for i in header["images"]], features, boxes, header["examples"])
    except (KeyError, ValueError, TypeError) as error:
        raise CorruptSampleError(f"{where}: cannot decode ({error!r})") from None


@dataclass
class FinetuneIndex:
    """A fine-tuning shard set: its task, answer table, sizes, and a ``ShardIndex`` view for planning."""

    task: str
    answers: list[str] | None
    images_per_sample: int
    labelled: int
    examples: int
    shards: ShardIndex
    raw: dict

    @property
    def fully_labelled(self) -> bool:
        return self.labelled == self.examples

    def iter_samples(
        self, shard: int, start: int = 0, stop: int | None = None
    ) -> Iterator[FinetuneSample | CorruptSampleError]:
        """Samples ``start <= position < stop`` of one shard. A sample that cannot be decoded is
        yielded as a CorruptSampleError in its place (the caller counts and skips it); after a read
        error the rest of the shard is unreadable and iteration ends there."""
        info = self.shards.shards[shard]
        for position, members in iter_shard(info.url, start, stop):
            if isinstance(members, CorruptSampleError):
                yield members
                continue
            try:
                yield decode_finetune_sample(
                    members, self.images_per_sample, f"{info.name}:{sample_key(position)}"
                )
            except CorruptSampleError as error:
                yield error


def open_finetune_index(source: str | Path, index: str | Path | None = None) -> FinetuneIndex:
    """Open a fine-tuning shard set from a directory, its index.json, a local pattern or URLs
    (the sources of :mod:`lxtrain.data.index`); every selected shard must be readable.
    ``index`` reads the index from there instead (a local path or a URL)."""
    shard_set = open_shard_set(
        source,
        FINETUNE_INDEX_FORMAT,
        lambda where, found: (
            f"{where}: not a fine-tuning shard index (format {found!r}, expected "
            f"{FINETUNE_INDEX_FORMAT!r}); pre-training shards cannot be used for fine-tuning"
        ),
        "fine-tuning shards are made by python -m lxtrain.data.finetune_shards",
        index,
    )
    raw = shard_set.raw
    infos = shard_infos(shard_set.entries, "samples", "examples_per_sample")
    view = ShardIndex(
        root=shard_set.root,
        name=raw.get("name", ""),
        boxes_per_image=int(raw["boxes_per_image"]),
        feature_dim=int(raw["feature_dim"]),
        answers=list(raw["answers"] or []),
        shards=infos,
        raw=raw,
        location=shard_set.location,
    )
    return FinetuneIndex(
        task=raw["task"],
        answers=raw["answers"],
        images_per_sample=int(raw["images_per_sample"]),
        labelled=int(raw["totals"]["labelled"]),
        examples=view.sentences,
        shards=view,
        raw=raw,
    )


def summary(index: dict) -> str:
    totals, dropped = index["totals"], index["dropped"]["counts"]
    text = (
        f"{index['name']}: {index['task']} {totals['samples']} samples, {totals['examples']} examples "
        f"({totals['labelled']} labelled), {len(index['shards'])} shard(s)"
    )
    if dropped:
        text += f"; dropped/repaired: {dropped}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lxtrain.data.finetune_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--json", required=True, nargs="+", type=Path, help="task JSON file(s) of one split")
    parser.add_argument("--tsv", required=True, nargs="+", type=Path, help="obj36 feature TSV file(s)")
    parser.add_argument("--answers", type=Path, help="answer table (trainval_ans2label.json); VQA/GQA")
    parser.add_argument("--out", required=True, type=Path, help="output shard directory")
    parser.add_argument("--name", help="shard name prefix (default: the output directory name)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples (images or pairs) per shard")
    args = parser.parse_args(argv)
    try:
        index = convert(ConvertTaskConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as error:
        print(f"lxtrain.data.finetune_shards: error: {error}", file=sys.stderr)
        return 2
    print(summary(index))
    for message in index["dropped"]["first_messages"][:5]:
        print(f"  {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
