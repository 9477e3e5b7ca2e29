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

Fine-tuning shards (:mod:`lxtrain.data.finetune_shards`) use the same writer and reader with
their own members. Shards are written with WebDataset's ``TarWriter`` (plain ustar, fixed
metadata) and opened with ``webdataset.gopen``, so a shard may be a local path or any URL gopen
opens: ``pipe:CMD`` (the command's stdout, e.g. ``pipe:aws s3 cp s3://bucket/x.tar -``),
``http(s)://`` (through curl), ``file:``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from webdataset import TarWriter
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from lxtrain.data.obj36 import RegionFeatures

ARRAY_MEMBERS = ("features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
MEMBER_SUFFIXES = tuple(f"{name}.npy" for name in ARRAY_MEMBERS) + ("json",)
KEY_DIGITS = 6
INDEX_NAME = "index.json"
INDEX_FORMAT = "lxtrain-shards/1"


class CorruptSampleError(ValueError):
    """A sample whose members are missing or cannot be decoded; the message names them."""


class ShardReadError(CorruptSampleError):
    """A shard that could not be opened or streamed (a failed ``pipe:`` command, an unreachable
    URL, a missing file): the bytes may be fine, the transport is not, so the fix differs."""


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_url(source: str) -> bool:
    """True for ``pipe:``, ``http(s)://``, ``file:`` ... (a scheme of two or more letters, so a
    Windows drive letter is not one); False for plain local paths."""
    return bool(_URL_SCHEME.match(source))


def local_path(source: str) -> Path | None:
    """The local file a shard source names (a plain path or ``file:``), or None for a remote URL."""
    if source.startswith("file:"):
        return Path(source[5:].removeprefix("//"))
    return None if is_url(source) else Path(source)


def shard_label(source: str) -> str:
    """How messages name a shard: a local file by its name (the directory is in the index
    message), a URL in full (the command or address is what the user has to check)."""
    path = local_path(source)
    return path.name if path is not None else source


def open_stream(source: str | Path) -> IO[bytes]:
    """Open a shard or index for reading through ``webdataset.gopen`` (local path or URL)."""
    return gopen(str(source), "rb")


def close_stream(stream: IO[bytes], abandon: bool) -> None:
    """Close a gopen stream. ``abandon``: stop a ``pipe:``/curl command we no longer read from
    (its download would otherwise run to the end before close() returns, and its broken-pipe
    exit status is no error of the data); errors on closing are then ignored. Otherwise close()
    waits for the command and raises OSError on a non-zero exit status."""
    process = getattr(stream, "proc", None)  # webdataset.gopen.Pipe keeps its subprocess here
    if not abandon:
        stream.close()
        return
    if process is not None and process.poll() is None:
        process.kill()
    with contextlib.suppress(OSError):
        stream.close()


_PIPE_STATUS = re.compile(r"exit (-?\d+) \(read\)")


def describe_read_error(error: BaseException) -> str:
    """An error of opening or reading a stream, in words: gopen's Pipe reports a failed command
    as ``((args,), {kwargs}): exit 1 (read) {}``; that becomes ``the command exited with status 1``."""
    text = str(error)
    status = _PIPE_STATUS.search(text)
    return f"the command exited with status {status.group(1)}" if status else text


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


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as npy bytes, never pickled (object arrays raise)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(regions: RegionFeatures, sentences: list[dict]) -> dict[str, bytes]:
    """Member suffix -> bytes for one image (features stored as float16)."""
    members = {
        "features.npy": npy_bytes(regions.features.astype(np.float16)),
        "boxes.npy": npy_bytes(np.asarray(regions.boxes, dtype=np.float32)),
        "objects_id.npy": npy_bytes(np.asarray(regions.objects_id, dtype=np.int64)),
        "objects_conf.npy": npy_bytes(np.asarray(regions.objects_conf, dtype=np.float32)),
        "attrs_id.npy": npy_bytes(np.asarray(regions.attrs_id, dtype=np.int64)),
        "attrs_conf.npy": npy_bytes(np.asarray(regions.attrs_conf, dtype=np.float32)),
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
    """Writes one tar shard with WebDataset's ``TarWriter`` under a temporary name and renames
    it into place on success; the one writer of pre-training and fine-tuning shards.

    A killed conversion therefore leaves at most a ``*.tmp`` file, never a truncated shard
    under a final name that a loader would trust. Metadata is fixed (ustar, mtime 0, mode 0444,
    no user or group names), so equal input gives byte-identical shards; TarWriter writes a
    sample's members in sorted order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        # Held open across write() calls and closed by close()/abort(): a context manager cannot span them.
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115
        self._tar = TarWriter(self._file, encoder=False, mtime=0, mode=0o444, user="", group="")
        self.count = 0

    def write(self, members: dict[str, bytes]) -> None:
        """Append one sample: member suffix (``features.npy``, ``json``) -> bytes; its key is
        its position in the shard."""
        bad = [suffix for suffix in members if not suffix or suffix.startswith(("_", "."))]
        if bad:  # TarWriter would drop "_" names silently; "." would change the sample key
            raise ValueError(f"member suffixes {bad} cannot be stored")
        self._tar.write({"__key__": sample_key(self.count), **members})
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _iter_shard_webdataset(
    source: str, start: int, stop: int | None
) -> Iterator[tuple[int, dict[str, bytearray] | CorruptSampleError]]:
    """The general reader (any tar dialect) behind :func:`iter_shard`'s fast path: WebDataset's
    own tar iteration over a freshly opened stream (it cannot seek, so it reads from the top)."""
    name = shard_label(source)
    try:
        stream = open_stream(source)
    except Exception as error:  # gopen raises whatever its scheme's opener raises
        yield start, ShardReadError(f"{name}: cannot open ({describe_read_error(error)})")
        return
    current: int | None = None
    last_member = ""
    members: dict[str, bytearray] = {}
    finished = False
    try:
        for item in tar_file_iterator(stream):
            key, _, suffix = item["fname"].partition(".")
            last_member = item["fname"]
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
            members[suffix] = bytearray(item["data"])
        else:
            finished = True
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        where = f"after member {last_member}" if last_member else "header"
        # tar_file_iterator appends " @ <stream>" to the message; the shard is named already.
        text = str(error.args[0] if error.args else error).split(" @ <", 1)[0]
        yield (current if current is not None else start), CorruptSampleError(f"{name}: {where}: {text}")
        close_stream(stream, abandon=True)
        return
    if current is not None:
        yield current, members
    try:
        close_stream(stream, abandon=not finished)
    except OSError as error:
        text = f"{name}: cannot read ({describe_read_error(error)})"
        yield (current if current is not None else start), ShardReadError(text)


class UnsupportedTarHeader(Exception):
    """A tar header the fast reader does not handle (pax, GNU long names): use tarfile."""


_BLOCK = 512


def parse_tar_header(header: bytes) -> tuple[str, int, bytes]:
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
        raise UnsupportedTarHeader("base-256 size")
    size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
    return name.decode("utf-8"), size, header[156:157]


def _skip(stream: IO[bytes], count: int, seekable: bool) -> bool:
    """Skip ``count`` bytes: a seek on a local file, reading and discarding on a pipe or URL.
    False if the stream ended first."""
    if seekable:
        stream.seek(count, os.SEEK_CUR)
        return True
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            return False
        count -= len(chunk)
    return True


def _read_exact(stream: IO[bytes], size: int) -> bytearray | None:
    """``size`` bytes as a bytearray (so decoded arrays are writable views, which
    torch.from_numpy needs), or None if the stream ended first."""
    data = bytearray(size)
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:  # local files: no intermediate copy
        got = 0
        view = memoryview(data)
        while got < size:
            n = readinto(view[got:])
            if not n:
                return None
            got += n
        return data
    got = 0  # gopen's Pipe has read() only
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            return None
        data[got : got + len(chunk)] = chunk
        got += len(chunk)
    return data


def iter_shard(
    source: str | Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, bytearray] | CorruptSampleError]]:
    """Yield ``(position, members)`` for samples ``start <= position < stop`` of one shard.

    ``source`` is a local path or a URL (:func:`open_stream`). Samples before ``start`` are
    skipped by seeking past their data on a local file (a reader that owns the second half of a
    shard does not read the first), by reading past them on a stream. A sample that cannot be
    read is yielded as a :class:`CorruptSampleError` (naming shard and member) in place of its
    members; after a read error the rest of the shard is unreadable and iteration ends there
    (callers compare the positions they got with the index to count what went missing). A
    shard that cannot be opened, or a ``pipe:`` command that exits non-zero before the tar's
    end-of-archive block, is yielded as a :class:`ShardReadError`.

    Plain ustar members (what :class:`ShardWriter` writes) are parsed here directly: about 75 us
    per 36 x 2048 image against ~240 us through WebDataset's ``tar_file_iterator`` (tarfile in
    stream mode), measured on the dev box. Any other header hands the shard to the latter.
    """
    source = str(source)
    name = shard_label(source)
    current: int | None = None
    members: dict[str, bytearray] = {}
    try:
        handle = open_stream(source)
    except Exception as error:  # gopen raises whatever its scheme's opener raises
        yield start, ShardReadError(f"{name}: cannot open ({describe_read_error(error)})")
        return
    seekable = bool(getattr(handle, "seekable", lambda: False)())
    # end: how reading stopped. "archive": the end-of-archive block (the data is complete, so a
    # pipe's exit status does not matter); "eof": the stream ended without one (a failed command
    # or download shows here: its exit status is reported); anything else: we stopped early.
    end = "early"
    problem: CorruptSampleError | None = None
    closed = False
    try:
        try:
            while True:
                header = handle.read(_BLOCK)
                if not header:
                    end = "eof"
                    break
                if header == bytes(_BLOCK):
                    end = "archive"
                    break
                if len(header) < _BLOCK:
                    where = f"after sample {sample_key(current)}" if current is not None else "header"
                    problem = CorruptSampleError(f"{name}: {where}: unexpected end of data")
                    end = "eof"
                    break
                try:
                    member, size, kind = parse_tar_header(header)
                    if kind not in (b"0", b"\0", b"5"):
                        raise UnsupportedTarHeader(f"type {kind!r}")
                except UnsupportedTarHeader:
                    closed = True
                    close_stream(handle, abandon=True)
                    resume_at = current if current is not None else start
                    yield from _iter_shard_webdataset(source, resume_at, stop)
                    return
                except ValueError as error:
                    where = f"after sample {sample_key(current)}" if current is not None else "first header"
                    problem = CorruptSampleError(f"{name}: {where}: {error}")
                    break
                padded = -(-size // _BLOCK) * _BLOCK
                key, _, suffix = member.partition(".")
                position = int(key) if key.isdigit() and kind != b"5" else -1
                if position < start:
                    if not _skip(handle, padded, seekable):
                        problem = CorruptSampleError(f"{name}: member {member}: unexpected end of data")
                        end = "eof"
                        break
                    continue
                if stop is not None and position >= stop:
                    break
                if position != current:
                    if current is not None:
                        yield current, members
                    current, members = position, {}
                data = _read_exact(handle, size)
                if data is None or not _skip(handle, padded - size, seekable):
                    problem = CorruptSampleError(f"{name}: member {member}: unexpected end of data")
                    end = "eof"
                    break
                members[suffix] = data
        except OSError as error:  # a pipe whose command failed mid-stream raises from read()
            problem = ShardReadError(f"{name}: cannot read ({describe_read_error(error)})")
        closed = True
        try:
            close_stream(handle, abandon=end != "eof")
        except OSError as error:  # the command's non-zero exit status, once its output ended
            text = f"{name}: cannot read ({describe_read_error(error)})"
            problem = ShardReadError(f"{problem}; {text}" if problem is not None else text)
    finally:
        if not closed:  # the consumer stopped early (or the fallback took over)
            close_stream(handle, abandon=True)
    if problem is None:
        if current is not None:
            yield current, members
        return
    # The sample being read when the problem showed may be incomplete: it is reported, not
    # yielded (at its position, or at ``start`` when nothing was read).
    yield (current if current is not None else start), problem
