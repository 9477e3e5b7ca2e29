"""Shard writer: round trip against the TSV source, counts, answer normalisation, bad input."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lxtrain.data import make_shards
from lxtrain.data.answers import AnswerTable, load_answer_table, normalize_answer
from lxtrain.data.index import open_index
from lxtrain.data.obj36 import TsvLineError, format_line, parse_line
from lxtrain.data.problems import DataError
from lxtrain.data.shard_format import ShardWriter, decode_sample, iter_shard
from lxtrain.synthetic.pretraining import SyntheticConfig, World, write_original_files

IMAGES = 60
WORLD = World(feature_dim=32, boxes=12, max_objects=4)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """Synthetic TSV/JSON/answer files (the published formats)."""
    out = tmp_path_factory.mktemp("originals")
    return write_original_files(SyntheticConfig(out=out, images=IMAGES, valid_images=6, world=WORLD, seed=3))


def _convert(originals: dict[str, Path], out: Path, **overrides) -> dict:
    options = dict(
        tsv=[originals["train_tsv"]],
        json=[originals["train_json"]],
        answers=originals["answers"],
        out=out,
        name="train",
        shard_size=25,
        workers=1,
        progress=False,
    )
    options.update(overrides)
    return make_shards.convert(make_shards.ConvertConfig(**options))


def _decoded(directory: Path) -> dict[str, object]:
    index = open_index(directory)
    images = {}
    for shard in index.shards:
        for position, members in iter_shard(shard.path):
            image = decode_sample(members, f"{shard.path.name}:{position}")
            images[image.img_id] = image
    return images


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("two", "2"),
        ("Ten.", "10"),
        ("a dog", "dog"),
        ("An apple.", "apple"),
        ("the grey", "gray"),
        ("Grey", "gray"),
        ("  red  ", "red"),
        ("a", "a"),  # an article alone is not stripped into nothing
        ("theater", "theater"),  # "the" only as a separate word
        ("eleven", "eleven"),
        ("3.", "3"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_answer_table_lookup_and_filter(tmp_path: Path) -> None:
    path = tmp_path / "all_ans.json"
    path.write_text(json.dumps([{"ans": "2", "dsets": ["vqa"]}, {"ans": "gray", "dsets": ["gqa"]}]))
    table = load_answer_table(path)
    assert table.convert_label({"Two": 0.3, "2": 0.9, "grey": 1.0, "unknown": 1.0}) == ([0, 1], [0.9, 1.0])
    assert load_answer_table(path, ["gqa"]).answers == ["gray"]
    assert AnswerTable(["x"]).lookup("y") is None


def test_round_trip_equals_tsv_source(originals: dict[str, Path], tmp_path: Path) -> None:
    index = _convert(originals, tmp_path / "shards")
    images = _decoded(tmp_path / "shards")
    lines = originals["train_tsv"].read_text().splitlines()
    assert len(images) == len(lines) == IMAGES == index["totals"]["images"]
    for line in lines:
        source = parse_line(line)
        image = images[source.img_id]
        assert image.features.dtype == np.float16
        np.testing.assert_allclose(image.features, source.features, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(image.features, source.features.astype(np.float16))
        for name in ("boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(getattr(image, name), getattr(source, name))
        assert (image.img_h, image.img_w) == (source.img_h, source.img_w)

    records = json.loads(originals["train_json"].read_text())
    table = load_answer_table(originals["answers"])
    sentences = sum(len(texts) for r in records for texts in r["sentf"].values())
    labelled = sum(1 for r in records for labels in r.get("labelf", {}).values() for label in labels if label)
    assert index["totals"]["sentences"] == sentences
    assert index["totals"]["qa_labelled"] == labelled  # every synthetic answer is in the table
    assert sum(index["totals"]["sources"].values()) == sentences
    assert sum(s["images"] for s in index["shards"]) == IMAGES
    assert index["dropped"]["counts"] == {}
    assert (index["boxes_per_image"], index["feature_dim"]) == (WORLD.boxes, WORLD.feature_dim)
    assert index["answers"]["list"] == table.answers

    # Labels are normalised and mapped: "two" / "a dog" / "3." in the JSON come back as ids.
    for record in records:
        image = images[record["img_id"]]
        stored = [s for s in image.sentences if s["answer_ids"]]
        raw = [label for labels in record.get("labelf", {}).values() for label in labels]
        for sentence, label in zip(stored, raw, strict=True):
            expected = table.convert_label(label)
            assert (sentence["answer_ids"], sentence["answer_scores"]) == (
                list(expected[0]),
                list(expected[1]),
            )


def test_parallel_conversion_is_byte_identical(originals: dict[str, Path], tmp_path: Path) -> None:
    _convert(originals, tmp_path / "one", workers=1)
    _convert(originals, tmp_path / "two", workers=2)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(names) >= 2
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not list((tmp_path / "two").glob("*.tmp"))


def _bad_inputs(originals: dict[str, Path], directory: Path) -> tuple[Path, Path]:
    """A TSV with three broken lines and a JSON with broken records and an image without features."""
    lines = originals["train_tsv"].read_text().splitlines(keepends=True)
    columns = lines[1].split("\t")
    lines[1] = "\t".join(columns[:9]) + "\n"  # line 2: 9 columns
    columns = lines[4].split("\t")
    columns[9] = "!!!not base64!!!"
    lines[4] = "\t".join(columns)  # line 5: bad base64 (last column keeps no newline -> add one)
    lines[4] = lines[4].rstrip("\n") + "\n"
    columns = lines[7].split("\t")
    columns[7] = "5"  # line 8: num_boxes disagrees with the arrays
    lines[7] = "\t".join(columns)
    tsv = directory / "bad_obj36.tsv"
    tsv.write_text("".join(lines))
    records = json.loads(originals["train_json"].read_text())
    records.append({"sentf": {"mscoco": ["no image id"]}})  # record IMAGES
    records.append({"img_id": "SYN_train_000000001"})  # record IMAGES + 1: no sentf
    records.append({"img_id": "NOT_IN_TSV", "sentf": {"mscoco": ["a dog.", "a cat."]}})
    sentences = directory / "bad.json"
    sentences.write_text(json.dumps(records))
    return tsv, sentences


def test_bad_input_is_reported_counted_and_skipped(originals: dict[str, Path], tmp_path: Path) -> None:
    tsv, sentences = _bad_inputs(originals, tmp_path)
    index = _convert(originals, tmp_path / "shards", tsv=[tsv], json=[sentences], workers=2)
    counts = index["dropped"]["counts"]
    assert counts["tsv_columns"] == 1
    assert counts["tsv_base64"] == 1
    assert counts["tsv_shape"] == 1
    assert counts["bad_record"] == 2
    # The two sentences of NOT_IN_TSV, and those of the three images whose lines are broken.
    records = {r["img_id"]: r for r in json.loads(originals["train_json"].read_text())}
    broken = [
        parse_line(line).img_id
        for line in np.array(originals["train_tsv"].read_text().splitlines())[[1, 4, 7]]
    ]
    lost = sum(len(texts) for img_id in broken for texts in records[img_id]["sentf"].values())
    assert counts["no_features"] == 2 + lost
    assert "image_without_sentences" not in counts
    messages = "\n".join(index["dropped"]["first_messages"])
    assert f"{tsv}:2: expected 10 tab-separated columns, got 9" in messages
    assert f"{tsv}:5: column features: bad base64" in messages
    assert f"{tsv}:8: column objects_id: {WORLD.boxes} entries but num_boxes is 5" in messages
    assert f"{sentences}: record {IMAGES}: no string 'img_id'" in messages
    assert f"{sentences}: record {IMAGES + 1} (img_id SYN_train_000000001): no 'sentf' object" in messages
    assert "NOT_IN_TSV" in messages
    assert index["totals"]["images"] == IMAGES - 3


@pytest.mark.parametrize("broken", ["tsv", "json"])
def test_strict_mode_stops_at_bad_input(originals: dict[str, Path], tmp_path: Path, broken: str) -> None:
    tsv, sentences = _bad_inputs(originals, tmp_path)
    overrides = {"tsv": [tsv]} if broken == "tsv" else {"json": [sentences]}
    with pytest.raises(DataError) as error:
        _convert(originals, tmp_path / "shards", strict=True, **overrides)
    expected = f"{tsv}:2:" if broken == "tsv" else f"{sentences}: record {IMAGES}"
    assert expected in str(error.value)
    assert not (tmp_path / "shards" / "index.json").exists()


def test_parse_line_rejects_bad_lines(originals: dict[str, Path]) -> None:
    line = originals["train_tsv"].read_text().splitlines()[0]
    regions = parse_line(line)
    assert parse_line(format_line(regions)).img_id == regions.img_id
    columns = line.split("\t")
    short = base64.b64encode(np.zeros(3, np.float32).tobytes()).decode()
    for position, value, reason in [
        (8, short, "tsv_shape"),
        (1, "tall", "tsv_format"),
        (3, "@@", "tsv_base64"),
    ]:
        broken = list(columns)
        broken[position] = value
        with pytest.raises(TsvLineError) as error:
            parse_line("\t".join(broken))
        assert error.value.reason == reason


def test_killed_writer_leaves_no_final_shard(tmp_path: Path) -> None:
    target = tmp_path / "x-000000.tar"
    with pytest.raises(RuntimeError), ShardWriter(target) as writer:
        writer.write({s: b"1" for s in ("features.npy", "boxes.npy", "objects_id.npy")} | _rest())
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())


def _rest() -> dict[str, bytes]:
    return {s: b"1" for s in ("objects_conf.npy", "attrs_id.npy", "attrs_conf.npy", "json")}


def test_existing_shards_need_overwrite(originals: dict[str, Path], tmp_path: Path) -> None:
    _convert(originals, tmp_path / "shards")
    with pytest.raises(FileExistsError):
        _convert(originals, tmp_path / "shards")
    _convert(originals, tmp_path / "shards", overwrite=True)


def test_cli_prints_summary(originals: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--tsv", str(originals["train_tsv"]), "--json", str(originals["train_json"])]
    argv += [
        "--answers",
        str(originals["answers"]),
        "--out",
        str(tmp_path / "s"),
        "--workers",
        "1",
        "--no-progress",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "lxtrain.data.make_shards", *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"{IMAGES} images" in result.stdout and "dropped: nothing" in result.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "lxtrain.data.make_shards",
            *argv[2:6],
            "--out",
            str(tmp_path / "t"),
            "--tsv",
            "nope",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_truncated_shard_yields_error_naming_member(originals: dict[str, Path], tmp_path: Path) -> None:
    _convert(originals, tmp_path / "shards")
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    items = list(iter_shard(shard))
    assert any(isinstance(payload, Exception) for _, payload in items)
    good = [p for p, payload in items if not isinstance(payload, Exception)]
    assert good == list(range(len(good)))
    with tarfile.open(tmp_path / "shards" / shard.name.replace("000000", "000001")) as tar:
        assert all(
            m.name.split(".", 1)[1]
            in {
                "features.npy",
                "boxes.npy",
                "objects_id.npy",
                "objects_conf.npy",
                "attrs_id.npy",
                "attrs_conf.npy",
                "json",
            }
            for m in tar.getmembers()
        )


@pytest.mark.multiproc
def test_mpi_conversion_matches_single_process(originals: dict[str, Path], tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun")
    _convert(originals, tmp_path / "single")
    argv = ["--tsv", str(originals["train_tsv"]), "--json", str(originals["train_json"])]
    argv += ["--answers", str(originals["answers"]), "--out", str(tmp_path / "mpi"), "--shard-size", "25"]
    argv += ["--workers", "1", "--no-progress"]
    env = {**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    result = subprocess.run(
        [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            sys.executable,
            "-m",
            "lxtrain.data.make_shards",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    single = json.loads((tmp_path / "single" / "index.json").read_text())
    mpi = json.loads((tmp_path / "mpi" / "index.json").read_text())
    assert mpi["totals"] == single["totals"] and mpi["shards"] == single["shards"]
    for shard in single["shards"]:
        assert (tmp_path / "mpi" / shard["name"]).read_bytes() == (
            tmp_path / "single" / shard["name"]
        ).read_bytes()
