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
import math
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
INDEX_NAME = "index.json"
INDEX_FORMAT = "lxtrain-shards/1"


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


_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def load_npy(data: bytes | bytearray) -> np.ndarray:
    """Decode npy bytes without pickle; a zero-copy view for the version-1 headers we write.

    ``np.load`` spends ~200 us per array parsing the header with ``ast.literal_eval``; every
    sample of a shard has the same few headers, so parsed headers are cached by their bytes.
    """
    if data[:8] == _NPY_MAGIC:
        end = 10 + int.from_bytes(data[8:10], "little")
        header = bytes(data[:end])
        parsed = _npy_headers.get(header)
        if parsed is None:
            stream = io.BytesIO(data)
            np.lib.format.read_magic(stream)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            if dtype.hasobject or fortran:
                raise ValueError("object or Fortran-ordered arrays are not allowed in shards")
            # The element count is cached too: np.prod costs ~15 us per call, several per image.
            parsed = (dtype, shape, end, math.prod(shape))
            if len(_npy_headers) < 4096:
                _npy_headers[header] = parsed
        dtype, shape, offset, count = parsed
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes for shape {shape} {dtype}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    if data[:6] != _NPY_MAGIC[:6]:
        # np.load would take anything else for a pickle and advise allow_pickle: never here.
        raise ValueError(f"not an npy array (starts with {bytes(data[:8])!r})")
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(members: dict[str, bytes | bytearray], where: str) -> ImageSample:
    """Decode a sample's members; ``where`` (shard and key) goes into every error message."""
    missing = [suffix for suffix in MEMBER_SUFFIXES if suffix not in members]
    if missing:
        raise CorruptSampleError(f"{where}: missing member(s) {', '.join(missing)}")
    arrays = {}
    for name in ARRAY_MEMBERS:
        try:
            arrays[name] = load_npy(members[f"{name}.npy"])
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


def _iter_shard_tarfile(
    path: Path, start: int, stop: int | None
) -> Iterator[tuple[int, dict[str, bytearray] | CorruptSampleError]]:
    """The general reader (any tar dialect) behind :func:`iter_shard`'s fast path."""
    name = path.name
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
            if not key.isdigit() or not info.isfile():
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
                data = bytearray(handle.read()) if handle is not None else bytearray()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (tarfile.TarError, OSError, EOFError) as error:
                yield position, CorruptSampleError(f"{name}: member {info.name}: {error}")
                return
            members[suffix] = data
    if current is not None:
        yield current, members


class _UnsupportedHeader(Exception):
    """A tar header the fast reader does not handle (pax, GNU long names): use tarfile."""


_BLOCK = 512


def _parse_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar header; ValueError if its checksum is wrong."""
    stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as spaces
        raise ValueError("bad header checksum")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    size_field = header[124:136]
    if size_field[0] & 0x80:
        raise _UnsupportedHeader("base-256 size")
    size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    return name.decode("utf-8"), size, header[156:157]


def iter_shard(
    path: str | Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, bytearray] | CorruptSampleError]]:
    """Yield ``(position, members)`` for samples ``start <= position < stop`` of one shard.

    Samples before ``start`` are skipped by seeking past their data, so a reader that owns the
    second half of a shard does not read the first. A sample that cannot be read is yielded as
    a :class:`CorruptSampleError` (naming shard and member) in place of its members; after a
    read error the rest of the shard is unreadable and iteration ends there (callers compare
    the positions they got with the index to count what went missing).

    Plain ustar members (what :class:`ShardWriter` writes) are parsed here directly, about ten
    times faster than :mod:`tarfile`; any other header hands the rest of the shard to tarfile.
    """
    path = Path(path)
    name = path.name
    current: int | None = None
    members: dict[str, bytearray] = {}
    try:
        handle = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 (closed in the finally below)
    except OSError as error:
        yield start, CorruptSampleError(f"{name}: cannot open ({error})")
        return
    try:
        while True:
            header = handle.read(_BLOCK)
            if len(header) < _BLOCK or header == bytes(_BLOCK):
                if header and len(header) < _BLOCK:
                    where = f"after sample {sample_key(current)}" if current is not None else "header"
                    yield (
                        (current if current is not None else start),
                        CorruptSampleError(f"{name}: {where}: unexpected end of data"),
                    )
                    return
                break
            try:
                member, size, kind = _parse_header(header)
                if kind not in (b"0", b"\0", b"5"):
                    raise _UnsupportedHeader(f"type {kind!r}")
            except _UnsupportedHeader:
                resume_at = current if current is not None else start
                yield from _iter_shard_tarfile(path, resume_at, stop)
                return
            except ValueError as error:
                where = f"after sample {sample_key(current)}" if current is not None else "first header"
                yield (
                    (current if current is not None else start),
                    CorruptSampleError(f"{name}: {where}: {error}"),
                )
                return
            padded = -(-size // _BLOCK) * _BLOCK
            key, _, suffix = member.partition(".")
            position = int(key) if key.isdigit() and kind != b"5" else -1
            if position < start:
                handle.seek(padded, os.SEEK_CUR)
                continue
            if stop is not None and position >= stop:
                break
            if position != current:
                if current is not None:
                    yield current, members
                current, members = position, {}
            # A bytearray, so decoded arrays are writable views (torch.from_numpy needs that).
            data = bytearray(size)
            if handle.readinto(data) < size:
                yield position, CorruptSampleError(f"{name}: member {member}: unexpected end of data")
                return
            handle.seek(padded - size, os.SEEK_CUR)
            members[suffix] = data
    finally:
        handle.close()
    if current is not None:
        yield current, members
