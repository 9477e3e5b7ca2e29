"""The synthetic world: deterministic, grounded (answers follow from the image), learnable
(features carry class and colour), BERT-vocabulary words only, same shards by both paths."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lxtrain.data.answers import normalize_answer
from lxtrain.data.obj36 import parse_line
from lxtrain.data.tokenizer import WordPieceEncoder, default_vocab_path
from lxtrain.synthetic.pretraining import (
    BACKGROUND_CLASSES,
    COLORS,
    OBJECT_CLASSES,
    SyntheticConfig,
    World,
    generate,
    make_image,
    write_original_files,
)

WORLD = World(feature_dim=64, boxes=12, max_objects=5)


@pytest.fixture(scope="module")
def world_files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("world")
    return write_original_files(SyntheticConfig(out=out, images=120, valid_images=40, world=WORLD, seed=5))


def _images(paths: dict[str, Path], split: str) -> list[tuple[object, dict]]:
    records = {r["img_id"]: r for r in json.loads(paths[f"{split}_json"].read_text())}
    regions = [parse_line(line) for line in paths[f"{split}_tsv"].read_text().splitlines()]
    return [(r, records[r.img_id]) for r in regions]


def test_generation_is_deterministic(world_files: dict[str, Path], tmp_path: Path) -> None:
    again = write_original_files(
        SyntheticConfig(out=tmp_path, images=120, valid_images=40, world=WORLD, seed=5)
    )
    for role in ("train_tsv", "train_json", "minival_tsv", "answers"):
        assert again[role].read_bytes() == world_files[role].read_bytes(), role
    other = write_original_files(
        SyntheticConfig(out=tmp_path / "o", images=120, valid_images=40, world=WORLD, seed=6)
    )
    assert other["train_tsv"].read_bytes() != world_files["train_tsv"].read_bytes()


def test_answers_follow_from_the_image(world_files: dict[str, Path]) -> None:
    singular = {name: i for i, (name, _) in enumerate(OBJECT_CLASSES)}
    plural = {name: i for i, (_, name) in enumerate(OBJECT_CLASSES)}
    checked = 0
    for regions, record in _images(world_files, "train"):
        objects = regions.objects_id < len(OBJECT_CLASSES)
        assert 1 <= objects.sum() <= WORLD.max_objects
        assert (regions.objects_id[~objects] < len(OBJECT_CLASSES) + len(BACKGROUND_CLASSES)).all()
        area = (regions.boxes[:, 2] - regions.boxes[:, 0]) * (regions.boxes[:, 3] - regions.boxes[:, 1])
        share = area / (regions.img_w * regions.img_h)
        for source, labels in record["labelf"].items():
            for question, label in zip(record["sentf"][source], labels, strict=True):
                answer = normalize_answer(max(label, key=label.get))
                if match := re.fullmatch(r"what color is the (\w+)\?", question):
                    (box,) = np.flatnonzero(regions.objects_id == singular[match[1]])
                    assert COLORS[regions.attrs_id[box]] == answer
                elif match := re.fullmatch(r"how many (\w+) are there\?", question):
                    assert (regions.objects_id == plural[match[1]]).sum() == int(answer)
                elif match := re.fullmatch(r"is there a (\w+) in the picture\?", question):
                    present = (regions.objects_id == singular[match[1]]).any()
                    assert answer == ("yes" if present else "no")
                elif match := re.fullmatch(r"is the (\w+) big or small\?", question):
                    (box,) = np.flatnonzero(regions.objects_id == singular[match[1]])
                    assert answer == ("big" if share[box] > 0.15 else "small")
                elif match := re.fullmatch(r"what is the (\w+) object\?", question):
                    boxes = np.flatnonzero(objects & (regions.attrs_id == COLORS.index(match[1])))
                    assert len(boxes) == 1 and OBJECT_CLASSES[regions.objects_id[boxes[0]]][0] == answer
                else:
                    raise AssertionError(f"unexpected question {question!r}")
                checked += 1
    assert checked > 300


def test_features_carry_class_and_colour(world_files: dict[str, Path]) -> None:
    """A nearest-class-mean classifier fit on train boxes labels held-out boxes: the signal is learnable."""
    train, valid = _images(world_files, "train"), _images(world_files, "minival")

    def stack(images, name):
        return np.concatenate([getattr(r, name) for r, _ in images])

    for label_name in ("objects_id", "attrs_id"):
        features, labels = stack(train, "features"), stack(train, label_name)
        means = np.stack([features[labels == k].mean(0) for k in range(labels.max() + 1)])
        test_features, test_labels = stack(valid, "features"), stack(valid, label_name)
        predicted = np.argmin(((test_features[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        accuracy = (predicted == test_labels).mean()
        assert accuracy > 0.9, (label_name, accuracy)


def test_sentences_use_whole_bert_vocabulary_words(world_files: dict[str, Path]) -> None:
    vocab = set(default_vocab_path().read_text().splitlines())
    records = json.loads(world_files["train_json"].read_text())
    texts = [t for r in records for texts in r["sentf"].values() for t in texts]
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", t)}
    assert words <= vocab, sorted(words - vocab)
    ids, _ = WordPieceEncoder().encode(texts)
    assert not (ids == 100).any()  # no [UNK]


def _samples(directory: Path) -> list[tuple[str, bytes]]:
    """Every member of every shard in index order (shard boundaries aside)."""
    from lxtrain.data.index import open_index
    from lxtrain.data.shard_format import iter_shard

    return [
        (suffix, bytes(data))
        for shard in open_index(directory).shards
        for _, members in iter_shard(shard.path)
        for suffix, data in sorted(members.items())
    ]


def test_direct_shards_equal_converted_shards(tmp_path: Path) -> None:
    common = dict(images=50, valid_images=10, world=WORLD, seed=2, shard_size=20)
    via_tsv = generate(SyntheticConfig(out=tmp_path / "tsv", shards=True, **common))
    direct = generate(SyntheticConfig(out=tmp_path / "direct", direct=True, workers=2, **common))
    for name in ("train", "valid"):
        for key in ("images", "sentences", "sources", "qa_labelled"):
            assert direct[name]["totals"][key] == via_tsv[name]["totals"][key]
        assert _samples(tmp_path / "direct" / "shards" / name) == _samples(tmp_path / "tsv" / "shards" / name)
    assert not (tmp_path / "direct" / "train_obj36.tsv").exists()


def test_cli(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "lxtrain.synthetic.pretraining",
        "--out",
        str(tmp_path),
        "--images",
        "30",
    ]
    command += ["--feature-dim", "16", "--boxes", "8", "--shards", "--shard-size", "10"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "30 images" in result.stdout
    index = json.loads((tmp_path / "shards" / "train" / "index.json").read_text())
    assert index["totals"]["images"] == 30 and len(index["shards"]) == 3
    assert (tmp_path / "shards" / "valid" / "index.json").is_file()


def test_min_objects_sets_the_salient_object_count_and_background_fills_the_rest() -> None:
    world = World(feature_dim=16, boxes=36, min_objects=2, max_objects=4)
    embeddings = world.embeddings()
    counts = set()
    for index in range(60):
        regions, _ = make_image(world, "train", index, 3, embeddings)
        objects = int((regions.objects_id < len(OBJECT_CLASSES)).sum())
        counts.add(objects)
        assert len(regions.objects_id) == 36
    assert counts == {2, 3, 4}
    with pytest.raises(ValueError, match="min_objects=5, max_objects=4"):
        World(boxes=36, min_objects=5, max_objects=4)
