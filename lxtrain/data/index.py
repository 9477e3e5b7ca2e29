"""Open a shard set: ``index.json`` plus the shard files it lists, checked before anything runs."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxtrain.data.shard_format import INDEX_FORMAT, INDEX_NAME


@dataclass
class ShardInfo:
    """One shard of the set: its file and per-image sentence counts."""

    path: Path
    images: int
    sentences: int
    sentences_per_image: np.ndarray  # (images,) int64
    image_base: int  # global id of the shard's first image
    sentence_base: np.ndarray  # (images,) int64, global id of each image's first sentence


@dataclass
class ShardIndex:
    """A shard set as the loader sees it.

    Global image ids and sentence ids number the selected shards' images and sentences in
    index order; they identify examples across ranks (coverage and disjointness checks).
    """

    root: Path
    name: str
    boxes_per_image: int
    feature_dim: int
    answers: list[str]
    shards: list[ShardInfo]
    raw: dict

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def sentences(self) -> int:
        return sum(s.sentences for s in self.shards)


def _expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # brace patterns are a convenience; plain globs work without it
        patterns = [pattern]
    else:
        patterns = list(braceexpand(pattern))
    return sorted({match for p in patterns for match in glob.glob(p)})


def open_index(source: str | Path) -> ShardIndex:
    """Open a shard set from a directory, an ``index.json`` path, or a tar glob/brace pattern.

    A pattern selects a subset of the shards listed in the ``index.json`` next to them.

    Raises:
        FileNotFoundError: nothing matches, the index is missing, or a listed shard is missing;
            the message names the pattern or file.
        ValueError: the index is not an lxtrain shard index, or a matched tar is not in it.
    """
    source_text = str(source)
    path = Path(source_text)
    selected: set[str] | None = None
    if path.is_dir():
        index_path = path / INDEX_NAME
    elif path.suffix == ".json":
        index_path = path
    else:
        matches = _expand(source_text)
        if not matches:
            raise FileNotFoundError(f"no shard matches {source_text!r}")
        parents = {Path(m).parent for m in matches}
        if len(parents) != 1:
            raise ValueError(
                f"{source_text!r} matches shards in several directories: {sorted(map(str, parents))}"
            )
        index_path = parents.pop() / INDEX_NAME
        selected = {Path(m).name for m in matches}
    if not index_path.is_file():
        raise FileNotFoundError(
            f"no shard index {index_path} for {source_text!r} (shards are made by python -m lxtrain.data.make_shards)"
        )
    raw = json.loads(index_path.read_text())
    if raw.get("format") != INDEX_FORMAT:
        raise ValueError(f"{index_path}: not an lxtrain shard index (format {raw.get('format')!r})")
    root = index_path.parent
    listed = {entry["name"] for entry in raw["shards"]}
    if selected is not None and selected - listed:
        raise ValueError(f"{sorted(selected - listed)[:3]} match {source_text!r} but are not in {index_path}")
    shards: list[ShardInfo] = []
    image_base = sentence_base = 0
    for entry in raw["shards"]:
        if selected is not None and entry["name"] not in selected:
            continue
        shard_path = root / entry["name"]
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {index_path} is missing")
        counts = np.asarray(entry["sentences_per_image"], dtype=np.int64)
        bases = sentence_base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        shards.append(
            ShardInfo(shard_path, int(entry["images"]), int(counts.sum()), counts, image_base, bases)
        )
        image_base += int(entry["images"])
        sentence_base += int(counts.sum())
    if not shards:
        raise FileNotFoundError(f"{source_text!r}: the index lists no shards")
    return ShardIndex(
        root=root,
        name=raw.get("name", ""),
        boxes_per_image=int(raw["boxes_per_image"]),
        feature_dim=int(raw["feature_dim"]),
        answers=list(raw.get("answers", {}).get("list", [])),
        shards=shards,
        raw=raw,
    )
