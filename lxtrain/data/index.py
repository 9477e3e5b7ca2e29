"""Open a shard set: its ``index.json`` plus the shards it lists, checked before anything runs.

One code path for pre-training and fine-tuning shards. A *source* is one of

- a local directory holding ``index.json`` (every shard it lists, next to it);
- a local ``index.json`` path (the same);
- a local glob or brace pattern of tars (``shards/train/train-{000000..000099}.tar``): a subset
  of the shards listed in the ``index.json`` next to them;
- a URL or a brace pattern of URLs that ``webdataset.gopen`` opens, e.g.
  ``pipe:aws s3 cp s3://bucket/train/train-{000000..000099}.tar -``,
  ``pipe:cat /data/train-{000000..000003}.tar`` or ``https://host/train/train-{000000..000099}.tar``:
  the shards named by the URLs' ``NAME.tar`` (a subset of the index);
- a URL of an index (``pipe:aws s3 cp s3://bucket/train/index.json -``): every shard it lists.

The loader plans epochs from the per-shard counts in the index, without opening a tar, so a URL
source needs its index too. It comes from, in order: the ``index`` argument (``--shard-index``
style: a local path or a URL), else the source's own index URL, else the first shard URL with
its ``NAME.tar`` replaced by ``index.json`` (``pipe:aws s3 cp s3://bucket/train/index.json -``),
i.e. the index next to the shards, fetched the same way. Shard URLs of an index URL are made the
same way backwards: the index's file name in the URL replaced by each listed shard's name.

Before anything trains, every selected shard is checked: a local one must exist; a remote one is
opened and its first tar header read (in parallel threads), so a URL that cannot be opened or a
``pipe:`` command that fails stops the run here, naming the URL and the fix.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from lxtrain.data.shard_format import (
    INDEX_FORMAT,
    INDEX_NAME,
    UnsupportedTarHeader,
    close_stream,
    describe_read_error,
    local_path,
    open_stream,
    parse_tar_header,
)

PRETRAIN_MAKER = "shards are made by python -m lxtrain.data.make_shards"
_PROBE_THREADS = 16
# The shard or index file a URL names: the last NAME.tar / NAME.json token, ending the URL or
# followed by a space (a command's next argument), a query or a quote.
_FILE_IN_URL = re.compile(r"[^\s/'\"=:]+\.(?:tar|json)(?=$|[\s?#'\"])")


@dataclass
class ShardInfo:
    """One shard of the set: where it is read from and its per-image sentence counts.

    Fine-tuning shards use the same record with samples for images and examples for sentences.
    """

    url: str  # a local path or a URL for webdataset.gopen
    name: str  # its file name in the index (NAME-000123.tar)
    images: int
    sentences: int
    sentences_per_image: np.ndarray  # (images,) int64
    image_base: int  # global id of the shard's first image
    sentence_base: np.ndarray  # (images,) int64, global id of each image's first sentence

    @property
    def path(self) -> Path:
        """The local file; a remote shard has none (read it with ``iter_shard(shard.url)``)."""
        path = local_path(self.url)
        if path is None:
            raise ValueError(f"shard {self.url!r} is remote: it has no local path")
        return path


@dataclass
class ShardIndex:
    """A shard set as the loader sees it.

    Global image ids and sentence ids number the selected shards' images and sentences in
    index order; they identify examples across ranks (coverage and disjointness checks).
    ``root`` is the directory of a local index (files beside it, such as ``objects_vocab.txt``,
    are looked up there); for a remote index it is ``os.devnull``, under which nothing exists.
    """

    root: Path
    name: str
    boxes_per_image: int
    feature_dim: int
    answers: list[str]
    shards: list[ShardInfo]
    raw: dict
    location: str = field(default="")  # where index.json was read from (path or URL)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def sentences(self) -> int:
        return sum(s.sentences for s in self.shards)


@dataclass
class ShardSet:
    """A resolved source: the index document and the selected entries with their shard URLs."""

    location: str
    root: Path
    raw: dict
    entries: list[tuple[dict, str]]  # (index entry, shard url), in index order


def _file_in_url(url: str) -> re.Match[str] | None:
    matches = list(_FILE_IN_URL.finditer(url))
    return matches[-1] if matches else None


def _replace_file(url: str, match: re.Match[str], name: str) -> str:
    return url[: match.start()] + name + url[match.end() :]


def _expand_local(pattern: str) -> list[str]:
    return sorted({match for p in braceexpand(pattern) for match in glob.glob(p)})


def write_index(document: dict, out: str | Path) -> Path:
    """Write ``out/index.json`` atomically (temp file, then rename): a loader never reads a
    half-written index, and the index is written after the shards, so it never lists a missing one."""
    path = Path(out) / INDEX_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    os.replace(tmp, path)
    return path


def _read_index(location: str, source: str, maker: str) -> dict:
    path = local_path(location)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no shard index {path} for {source!r} ({maker})")
        text = path.read_text()
    else:
        fix = (
            "check that the command or address works in a shell on this machine, or name the index "
            "explicitly (shard_index=..., a local path or URL of the index.json written with the shards)"
        )
        try:
            stream = open_stream(location)
            try:
                data = stream.read()
            except BaseException:
                close_stream(stream, abandon=True)
                raise
            close_stream(stream, abandon=False)  # a pipe: raises on the command's non-zero exit
        except Exception as error:  # gopen raises whatever its scheme's opener raises
            raise FileNotFoundError(
                f"cannot read the shard index {location!r} for {source!r} "
                f"({describe_read_error(error)}); {fix}"
            ) from None
        if not data:
            raise FileNotFoundError(f"the shard index {location!r} for {source!r} is empty; {fix}")
        text = data.decode("utf-8", "replace")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{location}: the shard index is not JSON ({error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise ValueError(f"{location}: not a shard index (no 'shards' list)")
    return raw


def probe_shard(url: str) -> str | None:
    """Open a remote shard and read its first tar header: None if that works, else why not.

    Only the first 512 bytes are read; the command or download is then stopped.
    """
    try:
        stream = open_stream(url)
    except Exception as error:  # gopen raises whatever its scheme's opener raises
        return f"cannot open: {describe_read_error(error)}"
    try:
        header = stream.read(512)
    except OSError as error:
        close_stream(stream, abandon=True)
        return f"cannot read: {describe_read_error(error)}"
    if len(header) < 512:
        try:
            close_stream(stream, abandon=False)
        except OSError as error:
            return f"cannot read: {describe_read_error(error)}"
        return f"only {len(header)} bytes, not a tar file" if header else "empty: no data came back"
    close_stream(stream, abandon=True)
    try:
        parse_tar_header(header)
    except UnsupportedTarHeader:
        return None  # a valid header of another tar dialect: the reader falls back for it
    except ValueError as error:
        return f"not a tar file ({error})"
    return None


def _check_shards(entries: list[tuple[dict, str]], location: str) -> None:
    remote = []
    for _, url in entries:
        path = local_path(url)
        if path is None:
            remote.append(url)
        elif not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {location} is missing")
    if not remote:
        return
    with ThreadPoolExecutor(max_workers=min(_PROBE_THREADS, len(remote))) as pool:
        problems = [(url, why) for url, why in zip(remote, pool.map(probe_shard, remote), strict=True) if why]
    if problems:
        url, why = problems[0]
        more = f" (and {len(problems) - 1} more of {len(remote)} shards)" if len(problems) > 1 else ""
        raise FileNotFoundError(
            f"shard {url!r} listed in {location}: {why}{more}. Check that the URL or command reads "
            f"the shard in a shell on this machine (credentials, bucket and path), or fix the pattern"
        )


def open_shard_set(
    source: str | Path,
    expected_format: str,
    wrong_format: Callable[[str, object], str],
    maker: str,
    index: str | Path | None = None,
) -> ShardSet:
    """Resolve a source (see the module docstring) into its index and selected shards, checked.

    Args:
        source: directory, index.json, local pattern, URL or URL pattern.
        expected_format: the index's ``format`` (pre-training or fine-tuning shards).
        wrong_format: (index location, found format) -> the error message for another format.
        maker: how such shards are made, for the message when no index is found.
        index: where to read the index instead (local path or URL).

    Raises:
        FileNotFoundError: nothing matches, the index or a listed shard is missing, or a URL
            cannot be opened; the message names the pattern, file or URL.
        ValueError: the index has another format, a matched tar is not in it, or a URL names
            no ``NAME.tar``.
    """
    text = str(source)
    explicit = str(index) if index is not None else None
    selected: dict[str, str] | None = None  # shard name -> url, when the source picks shards
    base: Callable[[str], str]  # shard name -> url, when the index lists them all
    local = local_path(text)
    if local is None:
        urls = list(braceexpand(text))
        found = [(_file_in_url(url), url) for url in urls]
        if len(urls) == 1 and found[0][0] is not None and found[0][0].group().endswith(".json"):
            location = explicit or text  # the source is the index: every shard it lists
            if explicit is None:
                match = found[0][0]
                base = lambda name: _replace_file(text, match, name)  # noqa: E731
            else:
                raise ValueError(f"{text!r} is an index URL; give either it or an index, not both")
        else:
            selected = {}
            for match, url in found:
                if match is None or not match.group().endswith(".tar"):
                    raise ValueError(
                        f"{url!r} names no shard file (NAME.tar) that could be looked up in an index; "
                        "give shard URLs ending in the shard's file name, or the index URL"
                    )
                if match.group() in selected:
                    raise ValueError(f"{text!r} names shard {match.group()} twice")
                selected[match.group()] = url
            first_match, first_url = found[0]
            location = explicit or _replace_file(first_url, first_match, INDEX_NAME)
    else:
        if local.is_dir():
            location = explicit or str(local / INDEX_NAME)
            base = lambda name: str(local / name)  # noqa: E731
        elif local.suffix == ".json":
            if explicit is not None:
                raise ValueError(f"{text!r} is an index; give either it or an index, not both")
            location = str(local)
            base = lambda name: str(local.parent / name)  # noqa: E731
        else:
            matches = _expand_local(str(local))
            if not matches:
                raise FileNotFoundError(
                    f"no shard matches {text!r}: check the directory and the pattern (a glob or a brace "
                    "range such as train-{000000..000099}.tar; URLs need a scheme such as pipe: or https:)"
                )
            parents = {Path(m).parent for m in matches}
            if len(parents) != 1:
                raise ValueError(
                    f"{text!r} matches shards in several directories: {sorted(map(str, parents))}"
                )
            location = explicit or str(parents.pop() / INDEX_NAME)
            selected = {Path(m).name: m for m in matches}
    raw = _read_index(location, text, maker)
    if raw.get("format") != expected_format:
        raise ValueError(wrong_format(location, raw.get("format")))
    listed = [entry["name"] for entry in raw["shards"]]
    if selected is not None:
        unknown = sorted(set(selected) - set(listed))
        if unknown:
            raise ValueError(f"{unknown[:3]} match {text!r} but are not in {location}")
        entries = [(entry, selected[entry["name"]]) for entry in raw["shards"] if entry["name"] in selected]
    else:
        entries = [(entry, base(entry["name"])) for entry in raw["shards"]]
    if not entries:
        raise FileNotFoundError(f"{text!r}: the index {location} lists no shards")
    _check_shards(entries, location)
    index_file = local_path(location)
    root = index_file.parent if index_file is not None else Path(os.devnull)
    return ShardSet(location=location, root=root, raw=raw, entries=entries)


def shard_infos(entries: list[tuple[dict, str]], count_key: str, per_item_key: str) -> list[ShardInfo]:
    """Per-shard records with global ids: ``count_key`` items per shard (images or samples),
    ``per_item_key`` the per-item sentence or example counts."""
    infos: list[ShardInfo] = []
    item_base = sentence_base = 0
    for entry, url in entries:
        counts = np.asarray(entry[per_item_key], dtype=np.int64)
        bases = sentence_base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        items = int(entry[count_key])
        infos.append(ShardInfo(url, entry["name"], items, int(counts.sum()), counts, item_base, bases))
        item_base += items
        sentence_base += int(counts.sum())
    return infos


def open_index(source: str | Path, index: str | Path | None = None) -> ShardIndex:
    """Open a pre-training shard set from any source of the module docstring.

    ``index`` reads the index from there instead (a local path or a URL). Errors: see
    :func:`open_shard_set`.
    """
    shard_set = open_shard_set(
        source,
        INDEX_FORMAT,
        lambda where, found: f"{where}: not an lxtrain shard index (format {found!r})",
        PRETRAIN_MAKER,
        index,
    )
    raw = shard_set.raw
    return ShardIndex(
        root=shard_set.root,
        name=raw.get("name", ""),
        boxes_per_image=int(raw["boxes_per_image"]),
        feature_dim=int(raw["feature_dim"]),
        answers=list(raw.get("answers", {}).get("list", [])),
        shards=shard_infos(shard_set.entries, "images", "sentences_per_image"),
        raw=raw,
        location=shard_set.location,
    )
