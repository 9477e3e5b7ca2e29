"""Shards through WebDataset: written with its TarWriter, readable by a plain WebDataset pipeline,
read by the loader from pipe: URL lists and index URLs, and clear errors for bad sources."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset

from lxtrain.data import finetune_shards
from lxtrain.data.index import open_index
from lxtrain.data.loader import UNREADABLE_SHARD_FIX, build_pretrain_loader
from lxtrain.data.problems import DataError
from lxtrain.data.shard_format import MEMBER_SUFFIXES, decode_sample, iter_shard
from lxtrain.synthetic.finetuning import TaskSetConfig
from lxtrain.synthetic.finetuning import generate as generate_task_sets
from lxtrain.synthetic.pretraining import SyntheticConfig, World, generate

WORLD = World(feature_dim=16, boxes=8, max_objects=3)
SHARDS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 training images in 6 shards (about 800 sentences)."""
    out = tmp_path_factory.mktemp("wds")
    generate(SyntheticConfig(out=out, images=120, valid_images=12, world=WORLD, shards=True, shard_size=20))
    train = out / "shards" / "train"
    assert len(list(train.glob("*.tar"))) == SHARDS
    return train


def _pipe_pattern(train: Path) -> str:
    return f"pipe:cat {train}/train-{{000000..{SHARDS - 1:06d}}}.tar"


def _settings(**options) -> dict:
    settings = dict(
        batch_size=8,
        rank=0,
        world_size=2,
        seed=3,
        num_workers=2,
        buffer_images=32,
        with_ids=True,
        in_process=True,
    )
    settings.update(options)
    return settings


def _same(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right) > 0
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ (a) WebDataset reads our shards


def test_plain_webdataset_pipeline_sees_every_sample_and_member(corpus: Path) -> None:
    index = open_index(corpus)
    urls = [shard.url for shard in index.shards]
    raw = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert len(raw) == index.images
    for sample in raw:
        assert {k for k in sample if not k.startswith("__")} == set(MEMBER_SUFFIXES)
    # The same bytes as lxtrain's own reader gives, sample by sample.
    ours = [members for shard in index.shards for _, members in iter_shard(shard.url)]
    for sample, members in zip(raw, ours, strict=True):
        assert all(bytes(members[suffix]) == sample[suffix] for suffix in MEMBER_SUFFIXES)
    # And WebDataset's own decoders understand the members (npy without pickle, json).
    decoded = next(iter(webdataset.WebDataset(urls[:1], shardshuffle=False).decode()))
    assert decoded["features.npy"].shape == (WORLD.boxes, WORLD.feature_dim)
    assert decoded["features.npy"].dtype == np.float16
    first = decode_sample(ours[0], "first")
    assert decoded["json"]["img_id"] == first.img_id and decoded["json"]["sentences"] == first.sentences
    np.testing.assert_array_equal(decoded["boxes.npy"], first.boxes)


def test_webdataset_reads_finetune_shards_written_by_the_same_writer(tmp_path: Path) -> None:
    generate_task_sets(TaskSetConfig(out=tmp_path, images=8, sets=8, world=WORLD, shards=True))
    index = finetune_shards.open_finetune_index(f"pipe:cat {tmp_path}/shards/nlvr2_train/index.json")
    assert index.task == "nlvr2" and index.shards.shards[0].url.startswith("pipe:cat ")
    samples = list(webdataset.WebDataset([s.url for s in index.shards.shards], shardshuffle=False))
    assert len(samples) == sum(s.images for s in index.shards.shards)
    for sample in samples:
        assert {k for k in sample if not k.startswith("__")} == {
            "features0.npy",
            "features1.npy",
            "boxes0.npy",
            "boxes1.npy",
            "json",
        }


def test_shards_written_by_hand_in_the_old_layout_still_read(corpus: Path, tmp_path: Path) -> None:
    """Shards of the earlier hand-written tar writer (members in a fixed, unsorted order; and a
    pax archive, which takes WebDataset's tar iteration) read the same as the current ones."""
    shard = open_index(corpus).shards[0]
    current = list(iter_shard(shard.url))
    for name, options in [
        ("old.tar", dict(format=tarfile.USTAR_FORMAT)),
        ("pax.tar", dict(format=tarfile.PAX_FORMAT, pax_headers={"comment": "forces a pax header"})),
    ]:
        path = tmp_path / name
        with tarfile.open(path, "w", **options) as tar:
            for position, members in current:
                for suffix in MEMBER_SUFFIXES:  # the old writer's order
                    info = tarfile.TarInfo(f"{position:06d}.{suffix}")
                    info.size, info.mtime = len(members[suffix]), 0
                    tar.addfile(info, io.BytesIO(bytes(members[suffix])))
        again = list(iter_shard(path, 2, 9))
        assert [p for p, _ in again] == list(range(2, 9))
        for (_, left), (_, right) in zip(again, current[2:9], strict=True):
            assert {k: bytes(v) for k, v in left.items()} == {k: bytes(v) for k, v in right.items()}
    # A pax archive cut inside a member's data fails in WebDataset's iteration, naming the shard
    # and the last complete member. (Cut at a header, tar iteration just ends: the loader then
    # reports the samples the index promised as missing.)
    data = (tmp_path / "pax.tar").read_bytes()
    cut = data.index(b"\x93NUMPY", len(data) // 2) + 50
    (tmp_path / "pax.tar").write_bytes(data[:cut])
    items = list(iter_shard(tmp_path / "pax.tar"))
    error = items[-1][1]
    assert isinstance(error, Exception), "the truncation went unnoticed"
    assert "pax.tar: after member" in str(error) and "unexpected end of data" in str(error)
    assert [p for p, _ in items[:-1]] == list(range(len(items) - 1))


# ------------------------------------------------------------------ (b) the loader from URLs


def test_loader_from_a_pipe_url_list_gives_the_local_batches(corpus: Path) -> None:
    local = list(build_pretrain_loader(corpus, **_settings()))
    piped_loader = build_pretrain_loader(_pipe_pattern(corpus), **_settings())
    assert piped_loader.index.shards[0].url == f"pipe:cat {corpus}/train-000000.tar"
    assert piped_loader.index.location == f"pipe:cat {corpus}/index.json"  # derived: next to the shards
    _same(local, list(piped_loader))
    # Exact mid-epoch resume works the same on a stream (it reads past, where a file seeks).
    resumed = build_pretrain_loader(_pipe_pattern(corpus), **_settings())
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 5})
    _same(local[5:], list(resumed))


def test_loader_from_an_index_url_with_worker_processes(corpus: Path) -> None:
    local = list(build_pretrain_loader(corpus, **_settings(rank=1)))
    remote = build_pretrain_loader(f"pipe:cat {corpus}/index.json", **_settings(rank=1, in_process=False))
    assert [s.url for s in remote.index.shards] == [
        f"pipe:cat {corpus}/train-{i:06d}.tar" for i in range(SHARDS)
    ]
    assert remote.index.root == Path(os.devnull)  # nothing is looked up beside a remote index
    _same(local, list(remote))


def test_explicit_index_for_urls_whose_neighbour_index_does_not_exist(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bucket"
    shutil.copytree(corpus, copy)
    (copy / "index.json").rename(tmp_path / "train-index.json")
    pattern = f"pipe:cat {copy}/train-{{000001..000002}}.tar"
    with pytest.raises(FileNotFoundError, match="cannot read the shard index 'pipe:cat .*/index.json'"):
        open_index(pattern)
    subset = open_index(pattern, index=tmp_path / "train-index.json")
    assert [s.name for s in subset.shards] == ["train-000001.tar", "train-000002.tar"]
    full = open_index(corpus)
    assert subset.sentences == full.shards[1].sentences + full.shards[2].sentences


# ------------------------------------------------------------------ (c) bad sources fail early


def test_a_shard_url_that_cannot_be_read_fails_before_training_naming_it(
    corpus: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "train"
    shutil.copytree(corpus, copy)
    (copy / "train-000004.tar").unlink()
    with pytest.raises(FileNotFoundError) as error:
        build_pretrain_loader(f"pipe:cat {copy}/train-{{000000..000005}}.tar", batch_size=4)
    message = str(error.value)
    assert f"pipe:cat {copy}/train-000004.tar" in message
    assert "exited with status 1" in message and "in a shell" in message


def test_a_failing_command_and_a_non_tar_are_named(corpus: Path, tmp_path: Path) -> None:
    script = tmp_path / "fetch.sh"
    script.write_text(f'case "$1" in\n  index.json) cat {corpus}/index.json ;;\n  *) exit 7 ;;\nesac\n')
    with pytest.raises(FileNotFoundError, match=r"train-000000.tar.*status 7"):
        open_index(f"pipe:sh {script} train-{{000000..000001}}.tar")
    script.write_text(
        f'case "$1" in\n  index.json) cat {corpus}/index.json ;;\n  *) echo not-a-tar ;;\nesac\n'
    )
    with pytest.raises(FileNotFoundError, match=r"not a tar file"):
        open_index(f"pipe:sh {script} train-000000.tar")


def test_bad_patterns_and_urls_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no shard matches .*nowhere-\{000000\.\.000003\}\.tar"):
        open_index(str(tmp_path / "nowhere-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="names no shard file"):
        open_index("pipe:aws s3 cp s3://bucket/train/shard-one -")
    with pytest.raises(FileNotFoundError, match=r"cannot read the shard index 'pipe:false index.json'"):
        open_index("pipe:false index.json")
    with pytest.raises(FileNotFoundError, match=r"cannot read the shard index"):
        open_index(f"pipe:cat {tmp_path}/missing/train-000000.tar")


def test_a_stream_that_breaks_mid_run_stops_naming_the_url_and_the_transport_fix(
    corpus: Path, tmp_path: Path
) -> None:
    """The first header reads fine (so the start-up check passes) but the command then fails."""
    script = tmp_path / "fetch.sh"
    size = (corpus / "train-000002.tar").stat().st_size
    script.write_text(
        f'case "$1" in\n  train-000002.tar) head -c {size // 2} {corpus}/$1; exit 3 ;;\n'
        f"  *) cat {corpus}/$1 ;;\nesac\n"
    )
    loader = build_pretrain_loader(
        f"pipe:sh {script} train-{{000000..{SHARDS - 1:06d}}}.tar", strict=True, **_settings(world_size=1)
    )
    with pytest.raises(DataError) as error:
        list(loader)
    message = str(error.value)
    assert f"pipe:sh {script} train-000002.tar" in message
    assert "status 3" in message and UNREADABLE_SHARD_FIX in message


def test_a_damaged_shard_behind_a_url_keeps_the_damage_message(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "train"
    shutil.copytree(corpus, copy)
    victim = copy / "train-000003.tar"
    data = bytearray(victim.read_bytes())
    header = json.loads((copy / "index.json").read_text())
    assert header["shards"][3]["name"] == victim.name
    # Garbage over the first npy member's magic: a decode error, not a transport error.
    offset = data.index(b"\x93NUMPY")
    data[offset : offset + 9] = b"\x00garbage!"
    victim.write_bytes(bytes(data))
    loader = build_pretrain_loader(f"pipe:cat {copy}/index.json", strict=True, **_settings(world_size=1))
    with pytest.raises(
        DataError, match=r"pipe:cat .*train-000003.tar: sample 000000.*cannot decode.*damaged"
    ):
        list(loader)
