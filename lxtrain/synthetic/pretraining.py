"""A built-in, grounded and learnable synthetic corpus in the published on-disk formats.

    python -m lxtrain.synthetic.pretraining --out data/synth --images 2000 --shards

The world: every image has ``--boxes`` regions. A few (``--min-objects``..``--max-objects``) are *objects* of
a named class ("dog", "car", ...) with a colour attribute ("red", ...) and a size ("small" or
"big", from the box area); the other regions are *background* ("sky", "grass", ...). A region's
feature is ``relu(class_embedding + 0.5 * colour_embedding + noise)`` with embeddings fixed by
the world seed, so the features carry class and colour and a model can learn them; the
detector labels (``objects_id``/``attrs_id``) are the true class and colour. Captions ("a big
red dog next to a small blue car.") and questions ("what color is the dog?" -> "red", "how many
cars are there?" -> "2", "is there a cat in the picture?" -> "no", "is the dog big or small?")
are built from the objects, so only the image answers them. All words are whole entries of
the BERT uncased vocabulary.

Output (``--out``): ``train_obj36.tsv``, ``minival_obj36.tsv``, ``synthetic_train.json``,
``synthetic_minival.json``, ``all_ans.json``; with ``--shards`` also ``shards/train`` and
``shards/valid`` converted by the regular shard writer; ``--direct`` skips the TSV/JSON files and
writes shards straight away (same sample encoding, for large benchmark corpora).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxtrain.batch import QA_SOURCE_NAMES
from lxtrain.data import make_shards
from lxtrain.data.answers import load_answer_table
from lxtrain.data.index import write_index
from lxtrain.data.obj36 import RegionFeatures, format_line
from lxtrain.data.problems import ProblemLog
from lxtrain.data.sentences import convert_record
from lxtrain.data.shard_format import ShardWriter, encode_sample

# (singular, plural) of object classes; detector class id = position.
OBJECT_CLASSES = (
    ("dog", "dogs"),
    ("cat", "cats"),
    ("car", "cars"),
    ("bus", "buses"),
    ("horse", "horses"),
    ("bird", "birds"),
    ("chair", "chairs"),
    ("cup", "cups"),
    ("ball", "balls"),
    ("boat", "boats"),
    ("truck", "trucks"),
    ("cow", "cows"),
    ("bike", "bikes"),
    ("tree", "trees"),
    ("table", "tables"),
    ("bottle", "bottles"),
)
# Background regions: detector class ids follow the object classes; never asked about.
BACKGROUND_CLASSES = ("sky", "grass", "wall", "road", "water", "floor")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange")
SIZES = ("small", "big")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLITS = {"train": 0, "minival": 1}

# Box area as a share of the image: small objects below, big objects above the threshold.
_SMALL_AREA = (0.02, 0.08)
_BIG_AREA = (0.2, 0.4)


@dataclass(frozen=True)
class World:
    """The fixed part of the world: sizes and the class/colour feature embeddings.

    Attributes:
        feature_dim: RoI feature dimension (2048 in the published data).
        boxes: regions per image (36 in the published data).
        max_objects: at most this many objects per image (the rest is background).
        min_objects: at least this many (the count is uniform in min..max).
        world_seed: seeds the embeddings; train and minival share one world.
        noise: standard deviation of the per-region feature noise.
    """

    feature_dim: int = 2048
    boxes: int = 36
    max_objects: int = 6
    world_seed: int = 0
    noise: float = 0.3
    min_objects: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= self.boxes:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= boxes; got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}, boxes={self.boxes}"
            )

    def size_arguments(self) -> list[str]:
        """The command-line flags that give this world's sizes to ``lxtrain.synthetic.pretraining`` and
        ``lxtrain.synthetic.finetuning`` (both take them), for tools that build those commands."""
        return [
            "--feature-dim",
            str(self.feature_dim),
            "--boxes",
            str(self.boxes),
            "--max-objects",
            str(self.max_objects),
            "--min-objects",
            str(self.min_objects),
        ]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(class embeddings (C, D), colour embeddings (K, D)); deterministic per world seed."""
        rng = np.random.default_rng([self.world_seed, 7919])
        classes = rng.standard_normal((len(OBJECT_CLASSES) + len(BACKGROUND_CLASSES), self.feature_dim))
        colors = rng.standard_normal((len(COLORS), self.feature_dim))
        return classes.astype(np.float32), colors.astype(np.float32)


def all_answers() -> list[dict]:
    """The synthetic ``all_ans.json``: every answer the questions can have."""
    answers = [*COLORS, *(str(n) for n in range(1, len(COUNT_WORDS))), "yes", "no", *SIZES]
    answers += [name for name, _ in OBJECT_CLASSES]
    return [{"ans": answer, "dsets": list(QA_SOURCE_NAMES)} for answer in answers]


def _count_label(count: int, rng: np.random.Generator) -> dict[str, float]:
    # Spelled-out numbers and a trailing "." exercise the answer normalisation end to end;
    # a neighbouring count with a low score mimics VQA's soft scores.
    text = COUNT_WORDS[count] if rng.random() < 0.2 else str(count)
    label = {text + ("." if rng.random() < 0.1 else ""): 1.0}
    if rng.random() < 0.3 and count > 1:
        label[str(count - 1)] = 0.3
    return label


def make_image(
    world: World, split: str, index: int, seed: int, embeddings: tuple[np.ndarray, np.ndarray]
) -> tuple[RegionFeatures, dict]:
    """Generate one image: its region features and its sentence-JSON record.

    Deterministic in (world, split, index, seed), so any split of the work gives the same corpus.
    """
    rng = np.random.default_rng([seed, SPLITS[split], index])
    class_embeddings, color_embeddings = embeddings
    img_w, img_h = (int(v) for v in rng.integers(320, 641, size=2))
    num_objects = int(rng.integers(world.min_objects, world.max_objects + 1))
    palette = rng.choice(len(OBJECT_CLASSES), size=min(3, num_objects), replace=False)
    object_classes = rng.choice(palette, size=num_objects)
    object_colors = rng.integers(0, len(COLORS), size=num_objects)
    object_sizes = rng.integers(0, len(SIZES), size=num_objects)

    num_background = world.boxes - num_objects
    classes = np.concatenate(
        [object_classes, len(OBJECT_CLASSES) + rng.integers(0, len(BACKGROUND_CLASSES), num_background)]
    )
    colors = np.concatenate([object_colors, rng.integers(0, len(COLORS), num_background)])
    area_range = np.where(object_sizes[:, None] == 1, _BIG_AREA, _SMALL_AREA)
    areas = np.concatenate(
        [rng.uniform(area_range[:, 0], area_range[:, 1]), rng.uniform(0.05, 0.5, num_background)]
    )
    aspect = rng.uniform(0.6, 1.6, size=world.boxes)
    box_w = np.minimum(np.sqrt(areas * aspect) * img_w, img_w - 1)
    box_h = np.minimum(np.sqrt(areas / aspect) * img_h, img_h - 1)
    x1 = rng.uniform(0, img_w - box_w)
    y1 = rng.uniform(0, img_h - box_h)
    boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1).astype(np.float32)

    features = class_embeddings[classes] + 0.5 * color_embeddings[colors]
    features += world.noise * rng.standard_normal(features.shape, dtype=np.float32)
    np.maximum(features, 0, out=features)  # post-ReLU like pooled RoI features

    objects_conf = np.concatenate([rng.uniform(0.6, 1.0, num_objects), rng.uniform(0.3, 0.7, num_background)])
    attrs_conf = rng.uniform(0.4, 0.95, world.boxes)
    order = rng.permutation(world.boxes)  # the position of a box carries no information
    img_id = f"SYN_{split}_{index:09d}"
    regions = RegionFeatures(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        objects_id=classes[order].astype(np.int64),
        objects_conf=objects_conf[order].astype(np.float32),
        attrs_id=colors[order].astype(np.int64),
        attrs_conf=attrs_conf[order].astype(np.float32),
        boxes=boxes[order],
        features=features[order].astype(np.float32),
    )
    record = _sentences(rng, index, object_classes, object_colors, object_sizes, classes[num_objects:])
    record["img_id"] = img_id
    return regions, record


def _sentences(
    rng: np.random.Generator,
    index: int,
    object_classes: np.ndarray,
    object_colors: np.ndarray,
    object_sizes: np.ndarray,
    background: np.ndarray,
) -> dict:
    """Captions and questions about one image, as a sentence-JSON record (without img_id)."""
    counts = Counter(int(c) for c in object_classes)
    objects = list(zip(object_classes.tolist(), object_colors.tolist(), object_sizes.tolist(), strict=True))

    def noun(obj: tuple[int, int, int], with_size: bool) -> str:
        cls, color, size = obj
        words = ([SIZES[size]] if with_size else []) + [COLORS[color], OBJECT_CLASSES[cls][0]]
        return " ".join(words)

    captions = []
    first = objects[0]
    if len(objects) > 1:
        captions.append(f"a {noun(first, True)} next to a {noun(objects[1], True)}.")
    else:
        captions.append(f"a picture of a {noun(first, True)}.")
    cls, many = max(counts.items(), key=lambda item: item[1])
    if many > 1:
        captions.append(f"there are {COUNT_WORDS[many]} {OBJECT_CLASSES[cls][1]} in the picture.")
    stuff = BACKGROUND_CLASSES[int(background[0]) - len(OBJECT_CLASSES)] if len(background) else "floor"
    pick = objects[int(rng.integers(len(objects)))]
    captions.append(f"a {noun(pick, False)} and the {stuff}.")

    questions: list[tuple[str, dict[str, float]]] = []
    singles = [obj for obj in objects if counts[obj[0]] == 1]
    if singles:
        obj = singles[int(rng.integers(len(singles)))]
        questions.append((f"what color is the {OBJECT_CLASSES[obj[0]][0]}?", {COLORS[obj[1]]: 1.0}))
        obj = singles[int(rng.integers(len(singles)))]
        questions.append((f"is the {OBJECT_CLASSES[obj[0]][0]} big or small?", {SIZES[obj[2]]: 1.0}))
        colors = Counter(color for _, color, _ in objects)
        unique = [obj for obj in singles if colors[obj[1]] == 1]
        if unique:
            obj = unique[int(rng.integers(len(unique)))]
            name = OBJECT_CLASSES[obj[0]][0]
            answer = f"a {name}" if rng.random() < 0.3 else name  # normalised back to the bare name
            questions.append((f"what is the {COLORS[obj[1]]} object?", {answer: 1.0}))
    cls = int(rng.choice(list(counts)))
    questions.append((f"how many {OBJECT_CLASSES[cls][1]} are there?", _count_label(counts[cls], rng)))
    present = rng.random() < 0.5
    absent = [c for c in range(len(OBJECT_CLASSES)) if c not in counts]
    cls = cls if present or not absent else int(rng.choice(absent))
    questions.append(
        (f"is there a {OBJECT_CLASSES[cls][0]} in the picture?", {"yes" if cls in counts else "no": 1.0})
    )

    caption_source = "mscoco" if index % 2 == 0 else "vg"
    sentf: dict[str, list[str]] = {caption_source: captions}
    labelf: dict[str, list[dict[str, float]]] = {}
    qa_sources = ("vqa",) if index % 2 == 0 else ("gqa", "visual7w")
    for position, (text, label) in enumerate(questions):
        source = qa_sources[position % len(qa_sources)]
        sentf.setdefault(source, []).append(text)
        labelf.setdefault(source, []).append(label)
    return {"sentf": sentf, "labelf": labelf}


@dataclass
class SyntheticConfig:
    """What to generate.

    Attributes:
        out: output directory.
        images: training images.
        valid_images: minival images (default: a tenth of ``images``, at least 1).
        seed: corpus seed (the world's embeddings use ``world.world_seed``).
        world: sizes and embeddings.
        shards: also convert to shards under ``out/shards/{train,valid}``.
        direct: write shards without the TSV/JSON files (implies ``shards``).
        shard_size: images per shard.
        workers: processes for generation and conversion.
        progress: show progress bars.
    """

    out: Path
    images: int
    valid_images: int | None = None
    seed: int = 0
    world: World = World()
    shards: bool = False
    direct: bool = False
    shard_size: int = 1000
    workers: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.images < 1:
            raise ValueError("images must be >= 1")
        if self.valid_images is None:
            self.valid_images = max(1, self.images // 10)


def _split_sizes(config: SyntheticConfig) -> dict[str, int]:
    return {"train": config.images, "minival": int(config.valid_images or 0)}


def write_original_files(config: SyntheticConfig) -> dict[str, Path]:
    """Write the TSV, sentence JSON and answer files; returns their paths by role."""
    config.out.mkdir(parents=True, exist_ok=True)
    embeddings = config.world.embeddings()
    paths = {"answers": config.out / "all_ans.json"}
    paths["answers"].write_text(json.dumps(all_answers()))
    for split, count in _split_sizes(config).items():
        tsv_path, json_path = config.out / f"{split}_obj36.tsv", config.out / f"synthetic_{split}.json"
        records = []
        with open(tsv_path, "w") as tsv:
            for index in range(count):
                regions, record = make_image(config.world, split, index, config.seed, embeddings)
                tsv.write(format_line(regions))
                records.append(record)
        json_path.write_text(json.dumps(records))
        paths[f"{split}_tsv"], paths[f"{split}_json"] = tsv_path, json_path
    return paths


def convert_original_files(config: SyntheticConfig, paths: dict[str, Path]) -> dict[str, dict]:
    """Run the regular shard writer on the written files (train -> ``train``, minival -> ``valid``)."""
    indexes = {}
    for split, name in (("train", "train"), ("minival", "valid")):
        convert_config = make_shards.ConvertConfig(
            tsv=[paths[f"{split}_tsv"]],
            json=[paths[f"{split}_json"]],
            answers=paths["answers"],
            out=config.out / "shards" / name,
            name=name,
            shard_size=config.shard_size,
            workers=config.workers,
            overwrite=True,
            progress=config.progress,
        )
        indexes[name] = make_shards.convert(convert_config)
    return indexes


_DIRECT: dict = {}
_QA_SETS = frozenset(QA_SOURCE_NAMES)


def _direct_shard(task: tuple[str, str, int, int, int]) -> make_shards.ShardResult:
    split, name, shard_index, start, stop = task
    config: SyntheticConfig = _DIRECT["config"]
    table, embeddings = _DIRECT["table"], _DIRECT["embeddings"]
    shard_name = f"{name}-{shard_index:06d}.tar"
    result = make_shards.ShardResult(index=shard_index, name=shard_name)
    with ShardWriter(config.out / "shards" / name / shard_name) as writer:
        for index in range(start, stop):
            regions, record = make_image(config.world, split, index, config.seed, embeddings)
            # The same record conversion as the JSON path, so labels are normalised identically.
            converted = convert_record(
                record, f"synthetic {split} {index}", table, _QA_SETS, ProblemLog(strict=True)
            )
            sentences = converted[1] if converted else []
            writer.write(encode_sample(regions, sentences))
            result.add_image(sentences)
    return result


def write_direct_shards(config: SyntheticConfig) -> dict[str, dict]:
    """Generate shards without the intermediate TSV/JSON (one task per shard, in parallel)."""
    config.out.mkdir(parents=True, exist_ok=True)
    answers_path = config.out / "all_ans.json"
    answers_path.write_text(json.dumps(all_answers()))
    table = load_answer_table(answers_path)
    _DIRECT.update(config=config, table=table, embeddings=config.world.embeddings())
    indexes = {}
    for split, name in (("train", "train"), ("minival", "valid")):
        started = time.perf_counter()
        count = _split_sizes(config)[split]
        (config.out / "shards" / name).mkdir(parents=True, exist_ok=True)
        tasks = [
            (split, name, shard, start, min(start + config.shard_size, count))
            for shard, start in enumerate(range(0, count, config.shard_size))
        ]
        if config.workers > 1 and len(tasks) > 1:
            with multiprocessing.get_context("fork").Pool(min(config.workers, len(tasks))) as pool:
                results = pool.map(_direct_shard, tasks)
        else:
            results = [_direct_shard(task) for task in tasks]
        index = make_shards.build_index(
            name,
            results,
            ProblemLog(),
            table,
            QA_SOURCE_NAMES,
            (config.world.boxes, config.world.feature_dim),
            {"synthetic": {"split": split, "seed": config.seed, "world": config.world.__dict__}},
            time.perf_counter() - started,
        )
        write_index(index, config.out / "shards" / name)
        indexes[name] = index
    return indexes


def generate(config: SyntheticConfig) -> dict[str, dict]:
    """Generate the corpus; returns the shard indexes by name (empty without shards)."""
    if config.direct:
        return write_direct_shards(config)
    paths = write_original_files(config)
    return convert_original_files(config, paths) if config.shards else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lxtrain.synthetic.pretraining", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", required=True, type=int, help="training images")
    parser.add_argument("--valid-images", type=int, default=None, help="minival images (default images/10)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the class/colour embeddings")
    parser.add_argument("--feature-dim", type=int, default=2048, help="RoI feature dimension")
    parser.add_argument("--boxes", type=int, default=36, help="regions per image")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image (rest: background)")
    parser.add_argument("--min-objects", type=int, default=1, help="at least this many objects per image")
    parser.add_argument("--noise", type=float, default=0.3, help="feature noise standard deviation")
    parser.add_argument("--shards", action="store_true", help="also convert to shards (train + valid)")
    parser.add_argument("--direct", action="store_true", help="write shards only, skipping TSV/JSON")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    args = parser.parse_args(argv)
    world = World(
        feature_dim=args.feature_dim,
        boxes=args.boxes,
        max_objects=min(args.max_objects, args.boxes),
        min_objects=args.min_objects,
        world_seed=args.world_seed,
        noise=args.noise,
    )
    config = SyntheticConfig(
        out=args.out,
        images=args.images,
        valid_images=args.valid_images,
        seed=args.seed,
        world=world,
        shards=args.shards or args.direct,
        direct=args.direct,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=True,
    )
    started = time.perf_counter()
    indexes = generate(config)
    print(f"synthetic corpus in {config.out} ({time.perf_counter() - started:.1f} s)")
    for index in indexes.values():
        print(make_shards.summary(index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
