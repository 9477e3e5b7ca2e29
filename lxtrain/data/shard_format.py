"""The on-disk shard format: one image per WebDataset sample, npy and json members only.

A sample with key ``000042`` (its position in the shard) has the members

    000042.features.npy      (O, D) float16   RoI features
    000042.boxes.npy         (O, 4) float32   x1, y1, x2, y2 in pixels
    000042.objects_id.npy    (O,)   int64     detector class
    000042.objects_conf.npy  (O,)   float32
    000042.attrs_id.npy      (O,)   int64     detector attribute
    000042.attrs_conf.npy    (O,)   float32
    000042.json              {"img_id", "img_h", "img_w", "sentences": [{"source", "text",
                             "answer_ids", "answer_scores"}, ...]}

Keys are positions rather than image ids because WebDataset splits a member name at its first
dot and image ids are not guaranteed to be dot-free. Nothing is pickled: arrays are read with
``allow_pickle=False``, so a shard cannot execute code.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxtrain.data.obj36 import RegionFeatures

ARRAY_MEMBERS = ("features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
MEMBER_SUFFIXES = tuple(f"{name}.npy" for name in ARRAY_MEMBERS) + ("json",)
KEY_DIGITS = 6


class CorruptSampleError(ValueError):
    """A sample whose members are missing or cannot be decoded; the message names them."""


@dataclass(slots=True)
class ImageSample:
    """One decoded image with all of its sentences."""

    img_id: str
    img_h: int
    img_w: int
    features: np.ndarray  # (O, D) float16
    boxes: np.ndarray  # (O, 4) float32, pixels
    objects_id: np.ndarray  # (O,) int64
    objects_conf: np.ndarray  # (O,) float32
    attrs_id: np.ndarray  # (O,) int64
    attrs_conf: np.ndarray  # (O,) float32
    sentences: list[dict]


def sample_key(position: int) -> str:
    return f"{position:0{KEY_DIGITS}d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(regions: RegionFeatures, sentences: list[dict]) -> dict[str, bytes]:
    """Member suffix -> bytes for one image (features stored as float16)."""
    members = {
        "features.npy": _npy_bytes(regions.features.astype(np.float16)),
        "boxes.npy": _npy_bytes(np.asarray(regions.boxes, dtype=np.float32)),
        "objects_id.npy": _npy_bytes(np.asarray(regions.objects_id, dtype=np.int64)),
        "objects_conf.npy": _npy_bytes(np.asarray(regions.objects_conf, dtype=np.float32)),
        "attrs_id.npy": _npy_bytes(np.asarray(regions.attrs_id, dtype=np.int64)),
        "attrs_conf.npy": _npy_bytes(np.asarray(regions.attrs_conf, dtype=np.float32)),
    }
    header = {"img_id": regions.img_id, "img_h": int(regions.img_h), "img_w": int(regions.img_w)}
    members["json"] = json.dumps({**header, "sentences": sentences}, separators=(",", ":")).encode()
    return members


def decode_sample(members: dict[str, bytes], where: str) -> ImageSample:
    """Decode a sample's members; ``where`` (shard and key) goes into every error message."""
    missing = [suffix for suffix in MEMBER_SUFFIXES if suffix not in members]
    if missing:
        raise CorruptSampleError(f"{where}: missing member(s) {', '.join(missing)}")
    arrays = {}
    for name in ARRAY_MEMBERS:
        try:
            arrays[name] = np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise CorruptSampleError(f"{where}.{name}.npy: cannot decode ({error})") from None
    try:
        header = json.loads(members["json"])
        sentences = header["sentences"]
        img_id, img_h, img_w = header["img_id"], int(header["img_h"]), int(header["img_w"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptSampleError(f"{where}.json: cannot decode ({error})") from None
    num_boxes = len(arrays["features"])
    if arrays["features"].ndim != 2 or any(len(arrays[n]) != num_boxes for n in ARRAY_MEMBERS):
        raise CorruptSampleError(f"{where}: arrays disagree on the number of boxes")
    return ImageSample(img_id=img_id, img_h=img_h, img_w=img_w, sentences=sentences, **arrays)


class ShardWriter:
    """Writes one tar shard under a temporary name and renames it into place on success.

    A killed conversion therefore leaves at most a ``*.tmp`` file, never a truncated shard
    under a final name that a loader would trust.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        # Held open across write() calls and closed by close()/abort(): a context manager cannot span them.
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0

    def write(self, members: dict[str, bytes]) -> None:
        key = sample_key(self.count)
        for suffix in MEMBER_SUFFIXES:
            data = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # fixed metadata: identical input gives byte-identical shards
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        self._tar.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(
    path: str | Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, bytes] | CorruptSampleError]]:
    """Yield ``(position, members)`` for samples ``start <= position < stop`` of one shard.

    Samples before ``start`` are skipped by seeking past their data, so a reader that owns the
    second half of a shard does not read the first. A sample that cannot be read is yielded as
    a :class:`CorruptSampleError` (naming shard and member) in place of its members; after a
    read error the rest of the shard is unreadable and iteration ends there (callers compare
    the positions they got with the index to count what went missing).
    """
    name = Path(path).name
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by the `with tar` below)
    except (tarfile.TarError, OSError) as error:
        yield start, CorruptSampleError(f"{name}: cannot open ({error})")
        return
    current: int | None = None
    members: dict[str, bytes] = {}
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as error:
                where = f"sample {sample_key(current)}" if current is not None else "header"
                yield (
                    (current if current is not None else start),
                    CorruptSampleError(f"{name}: {where}: {error}"),
                )
                return
            if info is None:
                break
            key, _, suffix = info.name.partition(".")
            if not key.isdigit():
                continue
            position = int(key)
            if position < start:
                continue
            if stop is not None and position >= stop:
                break
            if position != current:
                if current is not None:
                    yield current, members
                current, members = position, {}
            try:
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (tarfile.TarError, OSError, EOFError) as error:
                yield position, CorruptSampleError(f"{name}: member {info.name}: {error}")
                return
            members[suffix] = data
    if current is not None:
        yield current, members
