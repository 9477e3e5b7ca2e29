"""The published region-feature TSV (``*_obj36.tsv``, SPEC section 1): parse and write one line.

Lines are parsed by hand (split on tabs) instead of with the csv module: the format has no
quoting, and the csv module needs a raised field-size limit and is slower on 400 KB fields.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

COLUMNS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)

# Column -> (dtype, trailing shape after N); features' last dimension is inferred.
_ARRAY_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "objects_id": ("<i8", ()),
    "objects_conf": ("<f4", ()),
    "attrs_id": ("<i8", ()),
    "attrs_conf": ("<f4", ()),
    "boxes": ("<f4", (4,)),
}


class TsvLineError(ValueError):
    """A TSV line that cannot be used; the message says why (the caller adds file and line).

    ``reason`` is the short key conversion counts it under: ``tsv_columns``, ``tsv_base64``,
    ``tsv_shape`` or ``tsv_format``.
    """

    def __init__(self, message: str, reason: str = "tsv_format") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RegionFeatures:
    """The detector output for one image, with the TSV's dtypes."""

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # (N,) int64
    objects_conf: np.ndarray  # (N,) float32
    attrs_id: np.ndarray  # (N,) int64
    attrs_conf: np.ndarray  # (N,) float32
    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in pixels
    features: np.ndarray  # (N, D) float32

    @property
    def num_boxes(self) -> int:
        return len(self.objects_id)


def _b64decode_strict(text: bytes) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except TypeError:  # Python < 3.11 has no strict_mode
        return base64.b64decode(text, validate=True)


def _decode_array(name: str, text: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        raw = _b64decode_strict(text)
    except (binascii.Error, ValueError) as error:
        raise TsvLineError(f"column {name}: bad base64 ({error})", "tsv_base64") from None
    item = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) % item:
        raise TsvLineError(
            f"column {name}: {len(raw)} bytes is not a whole number of {shape} {dtype}", "tsv_shape"
        )
    return np.frombuffer(raw, dtype=dtype).reshape((-1, *shape))


def parse_line(line: str | bytes) -> RegionFeatures:
    """Parse one TSV line into arrays, checking every shape against ``num_boxes``.

    Raises:
        TsvLineError: wrong column count, non-integer sizes, bad base64 or a shape mismatch.
    """
    # Bytes all the way: decoding a 400 KB line to str and back costs more than the base64.
    if isinstance(line, str):
        line = line.encode("utf-8")
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(COLUMNS):
        raise TsvLineError(f"expected {len(COLUMNS)} tab-separated columns, got {len(fields)}", "tsv_columns")
    row = dict(zip(COLUMNS, fields, strict=True))
    try:
        img_h, img_w, num_boxes = int(row["img_h"]), int(row["img_w"]), int(row["num_boxes"])
    except ValueError as error:
        raise TsvLineError(f"img_h/img_w/num_boxes must be integers ({error})") from None
    try:
        img_id = row["img_id"].decode("utf-8")
    except UnicodeDecodeError as error:
        raise TsvLineError(f"img_id is not UTF-8 ({error})") from None
    if not img_id:
        raise TsvLineError("empty img_id")
    arrays = {name: _decode_array(name, row[name], *spec) for name, spec in _ARRAY_COLUMNS.items()}
    for name, array in arrays.items():
        if len(array) != num_boxes:
            raise TsvLineError(
                f"column {name}: {len(array)} entries but num_boxes is {num_boxes}", "tsv_shape"
            )
    features = _decode_array("features", row["features"], "<f4", ())
    if num_boxes <= 0 or features.size % num_boxes:
        raise TsvLineError(
            f"column features: {features.size} floats do not split into {num_boxes} boxes", "tsv_shape"
        )
    return RegionFeatures(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        features=features.reshape(num_boxes, -1),
        **arrays,
    )


def _encode_array(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def format_line(regions: RegionFeatures) -> str:
    """One TSV line (with trailing newline) in the published layout."""
    fields = [
        regions.img_id,
        str(int(regions.img_h)),
        str(int(regions.img_w)),
        _encode_array(regions.objects_id, "<i8"),
        _encode_array(regions.objects_conf, "<f4"),
        _encode_array(regions.attrs_id, "<i8"),
        _encode_array(regions.attrs_conf, "<f4"),
        str(regions.num_boxes),
        _encode_array(regions.boxes, "<f4"),
        _encode_array(regions.features, "<f4"),
    ]
    return "\t".join(fields) + "\n"
