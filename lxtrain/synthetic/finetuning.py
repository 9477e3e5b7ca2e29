"""Synthetic fine-tuning sets (VQA-, GQA- and NLVR2-style) from the synthetic world, in the published formats.

    python -m lxtrain.synthetic.finetuning --out data/synth_tasks --images 600 --sets 300 --shards

The images come from the same world as the pre-training corpus (``lxtrain.synthetic.pretraining``:
same class/colour embeddings for the same ``--world-seed`` and ``--feature-dim``) but from a
different corpus seed, so fine-tuning images are not pre-training images.

- VQA-style: the world's grounded questions ("what color is the dog?", "how many cars are
  there?", ...) with soft-score labels, ``answer_type`` (yes/no, number, other) and
  ``question_type``; integer question ids. Splits train / minival / test (test has no labels).
- GQA-style: the same questions on the same images with one-hot labels and string ids; splits
  train / testdev / test.
- NLVR2-style: statements about an image pair ("both images contain a dog.", "the left image
  contains a red car.", ...), true or false; each statement is paired with several image pairs
  (identifiers ``split-set-pair-sentence``), so consistency is measurable. Splits train / valid / test.

Answer tables (``trainval_ans2label.json`` / ``trainval_label2ans.json``) are ordered by train
frequency and hold two answers the pre-training table lacks ("0", "none"), so the answer-head
transfer from pre-training has shared and unshared rows, as with the real VQA table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxtrain.data import finetune_shards
from lxtrain.data.answers import normalize_answer
from lxtrain.data.obj36 import RegionFeatures, format_line
from lxtrain.synthetic.pretraining import COLORS, OBJECT_CLASSES, World, make_image

QA_SPLITS = {"vqa": ("train", "minival", "test"), "gqa": ("train", "testdev", "test")}
NLVR2_SPLITS = ("train", "valid", "test")
IMAGE_SPLIT_NUMBER = {"train": 0, "minival": 1, "test": 2}
EXTRA_ANSWERS = ("0", "none")
"""Answers in the fine-tuning tables that the pre-training table lacks (zero-initialised rows)."""


@dataclass
class TaskSetConfig:
    """What to generate.

    Attributes:
        out: output directory.
        images: QA training images (minival and test get a fifth each, at least 8).
        sets: NLVR2 training statements (valid and test get a fifth each, at least 8).
        pairs_per_set: image pairs per NLVR2 statement.
        seed: corpus seed (differs from the pre-training corpus's default 0).
        world: the shared world (feature dimension, boxes, embeddings).
        shards: also convert every split to fine-tuning shards under ``out/shards``.
    """

    out: Path
    images: int = 600
    sets: int = 300
    pairs_per_set: int = 2
    seed: int = 1
    world: World = World()
    shards: bool = False

    def split_size(self, total: int, split: str) -> int:
        return total if split == "train" else max(8, total // 5)


def _image_seed(config: TaskSetConfig, group: int) -> int:
    # make_image seeds with (seed, split, index); a distinct seed per image group keeps the QA
    # images, the NLVR2 images and the pre-training images apart.
    return 1000 * config.seed + group


def answer_type(answer: str) -> str:
    """The VQA answer type of a (normalised) answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def question_type(text: str) -> str:
    """VQA-style question type: the question's leading words."""
    words = text.rstrip("?").split()
    return " ".join(words[:3]) if words[:2] != ["how", "many"] else "how many"


def _qa_questions(record: dict) -> list[tuple[str, dict[str, float]]]:
    """(question, normalised soft label) pairs of one synthetic pre-training record."""
    questions = []
    for source, labels in record["labelf"].items():
        for text, label in zip(record["sentf"][source], labels, strict=True):
            normalised: dict[str, float] = {}
            for answer, score in label.items():
                key = normalize_answer(answer)
                normalised[key] = max(score, normalised.get(key, 0.0))
            questions.append((text, normalised))
    return questions


def write_qa_sets(config: TaskSetConfig, embeddings) -> dict[str, Path]:
    """Images for the QA tasks (shared by the VQA and GQA sets) and their JSON; returns written paths."""
    paths: dict[str, Path] = {}
    per_split: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
    for split, number in IMAGE_SPLIT_NUMBER.items():
        tsv = config.out / "features" / f"qa_{split}_obj36.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        with open(tsv, "w") as handle:
            for index in range(config.split_size(config.images, split)):
                regions, record = make_image(
                    config.world, "train", index, _image_seed(config, number), embeddings
                )
                regions.img_id = f"SYNQA_{split}_{index:09d}"
                handle.write(format_line(regions))
                rows += [(regions.img_id, text, label) for text, label in _qa_questions(record)]
        per_split[split] = rows
        paths[f"qa_{split}_tsv"] = tsv
    frequency = Counter(answer for _, _, label in per_split["train"] for answer in label)
    table = [answer for answer, _ in frequency.most_common()] + [
        a for a in EXTRA_ANSWERS if a not in frequency
    ]
    for task, splits in QA_SPLITS.items():
        directory = config.out / task
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "trainval_ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(table)}))
        (directory / "trainval_label2ans.json").write_text(json.dumps(table))
        for image_split, split in zip(IMAGE_SPLIT_NUMBER, splits, strict=True):
            records = []
            for number, (img_id, text, label) in enumerate(per_split[image_split]):
                top = max(label, key=label.get)
                record = {"img_id": img_id, "sent": text}
                if task == "vqa":
                    record["question_id"] = IMAGE_SPLIT_NUMBER[image_split] * 10_000_000 + number
                    record |= {"answer_type": answer_type(top), "question_type": question_type(text)}
                else:
                    record["question_id"] = f"{image_split}{number:08d}"
                if image_split != "test":  # test splits are published without labels
                    record["label"] = label if task == "vqa" else {top: 1.0}
                records.append(record)
            paths[f"{task}_{split}"] = directory / f"{split}.json"
            paths[f"{task}_{split}"].write_text(json.dumps(records))
        paths[f"{task}_answers"] = directory / "trainval_ans2label.json"
    return paths


# ------------------------------------------------------------------------------------------
# NLVR2-style statements.


def _objects(regions: RegionFeatures) -> set[tuple[int, int]]:
    """(class, colour) of the image's objects (detector labels of the non-background boxes)."""
    return {
        (int(c), int(k))
        for c, k in zip(regions.objects_id, regions.attrs_id, strict=True)
        if c < len(OBJECT_CLASSES)
    }


# Template -> (text, truth over (left objects, right objects, subject)).
_TEMPLATES = (
    ("both images contain a {noun}.", lambda left, right, has: has(left) and has(right)),
    ("only one image contains a {noun}.", lambda left, right, has: has(left) != has(right)),
    ("the left image contains a {noun}.", lambda left, right, has: has(left)),
    ("the right image contains a {noun}.", lambda left, right, has: has(right)),
    ("there is a {noun} in at least one image.", lambda left, right, has: has(left) or has(right)),
)


def _statement(
    rng: np.random.Generator, seen: set[tuple[int, int]]
) -> tuple[str, Callable[[set, set], bool]]:
    """A random statement about an object ``seen`` in the image pool, and its truth function over
    (left objects, right objects). Picking seen objects keeps both truth values reachable."""
    template, truth = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    cls, color = sorted(seen)[int(rng.integers(len(seen)))]
    if rng.random() < 0.3:  # with a colour: "a red dog"
        noun = f"{COLORS[color]} {OBJECT_CLASSES[cls][0]}"

        def has(objects: set) -> bool:
            return (cls, color) in objects
    else:
        noun = OBJECT_CLASSES[cls][0]

        def has(objects: set) -> bool:
            return any(c == cls for c, _ in objects)

    return template.format(noun=noun), lambda left, right: bool(truth(left, right, has))


def write_nlvr2_sets(config: TaskSetConfig, embeddings) -> dict[str, Path]:
    """Image pairs and statements, labels balanced towards a fair coin.

    Each split draws a pool of images; every (statement, pair) takes the first pool pair (in a
    random order) whose truth value matches the coin, or the last one tried. Pool images can
    recur in several pairs of a split (under each pair's own image ids), never across splits.
    """
    paths: dict[str, Path] = {}
    directory = config.out / "nlvr2"
    directory.mkdir(parents=True, exist_ok=True)
    for number, split in enumerate(NLVR2_SPLITS):
        rng = np.random.default_rng([config.seed, 0x1F2, number])
        sets = config.split_size(config.sets, split)
        pool_size = max(16, sets * config.pairs_per_set)
        seed = _image_seed(config, 100 + number)
        pool = [make_image(config.world, "train", i, seed, embeddings)[0] for i in range(pool_size)]
        objects = [_objects(regions) for regions in pool]
        seen = set().union(*objects)
        tsv = config.out / "features" / f"nlvr2_{split}_obj36.tsv"
        records = []
        with open(tsv, "w") as handle:
            for set_id in range(sets):
                text, truth = _statement(rng, seen)
                for pair in range(config.pairs_per_set):
                    want = bool(rng.random() < 0.5)
                    for _ in range(200):
                        left, right = (int(i) for i in rng.choice(pool_size, size=2, replace=False))
                        label = truth(objects[left], objects[right])
                        if label == want:
                            break
                    stem = f"{split}-{set_id}-{pair}"
                    for side, image in enumerate((left, right)):
                        pool[image].img_id = f"{stem}-img{side}"
                        handle.write(format_line(pool[image]))
                    record = {
                        "identifier": f"{stem}-0",
                        "uid": f"nlvr2_{stem}-0",
                        "sent": text,
                        "img0": f"{stem}-img0",
                        "img1": f"{stem}-img1",
                    }
                    if split != "test":
                        record["label"] = int(label)
                    records.append(record)
        paths[f"nlvr2_{split}"] = directory / f"{split}.json"
        paths[f"nlvr2_{split}"].write_text(json.dumps(records))
        paths[f"nlvr2_{split}_tsv"] = tsv
    return paths


def convert_all(config: TaskSetConfig, paths: dict[str, Path]) -> dict[str, dict]:
    """Every split through the regular fine-tuning shard writer, into ``out/shards/<task>_<split>``."""
    indexes = {}
    for task, splits in (*QA_SPLITS.items(), ("nlvr2", NLVR2_SPLITS)):
        for position, split in enumerate(splits):
            tsv = (
                paths[f"nlvr2_{split}_tsv"]
                if task == "nlvr2"
                else paths[f"qa_{list(IMAGE_SPLIT_NUMBER)[position]}_tsv"]
            )
            name = f"{task}_{split}"
            indexes[name] = finetune_shards.convert(
                finetune_shards.ConvertTaskConfig(
                    task=task,
                    json=[paths[name]],
                    tsv=[tsv],
                    out=config.out / "shards" / name,
                    answers=paths.get(f"{task}_answers"),
                    shard_size=200,
                )
            )
    return indexes


def generate(config: TaskSetConfig) -> dict[str, dict]:
    """Write every task set; returns the shard indexes by name (empty without ``shards``)."""
    embeddings = config.world.embeddings()
    paths = write_qa_sets(config, embeddings)
    paths |= write_nlvr2_sets(config, embeddings)
    return convert_all(config, paths) if config.shards else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lxtrain.synthetic.finetuning", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", type=int, default=600, help="QA training images")
    parser.add_argument("--sets", type=int, default=300, help="NLVR2 training statements")
    parser.add_argument("--pairs-per-set", type=int, default=2, help="image pairs per NLVR2 statement")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (pre-training corpora use 0)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the class/colour embeddings")
    parser.add_argument("--feature-dim", type=int, default=2048, help="RoI feature dimension")
    parser.add_argument("--boxes", type=int, default=36, help="regions per image")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image (rest: background)")
    parser.add_argument("--min-objects", type=int, default=1, help="at least this many objects per image")
    parser.add_argument("--shards", action="store_true", help="also convert every split to shards")
    args = parser.parse_args(argv)
    world = World(
        feature_dim=args.feature_dim,
        boxes=args.boxes,
        max_objects=args.max_objects,
        min_objects=args.min_objects,
        world_seed=args.world_seed,
    )
    config = TaskSetConfig(
        out=args.out,
        images=args.images,
        sets=args.sets,
        pairs_per_set=args.pairs_per_set,
        seed=args.seed,
        world=world,
        shards=args.shards,
    )
    started = time.perf_counter()
    indexes = generate(config)
    print(f"synthetic fine-tuning sets in {config.out} ({time.perf_counter() - started:.1f} s)")
    for index in indexes.values():
        print(finetune_shards.summary(index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
