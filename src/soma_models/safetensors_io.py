"""A small, strict safetensors reader and an atomic writer, framework-free.

Format: 8 bytes little-endian u64 `N`, then `N` bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer; offsets are relative to the buffer's start. We check everything
the header claims (dtype known, byte size = prod(shape) * itemsize, offsets inside the
buffer, no overlaps, no unexplained bytes) and report *every* problem at once.

Tensors come back as NumPy arrays that are views into one buffer: a copy-on-write memory
map for files (nothing is read twice; pages are read on first touch), or the caller's
bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soma_models.atomic import atomic_write
from soma_models.errors import WeightsFormatError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Known to the format but without a NumPy dtype: reported by name, never decoded.
OPAQUE_DTYPES = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024

PathLike = str | os.PathLike


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data buffer in the file


def describe_source(source: PathLike | bytes | bytearray | memoryview) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"


def _parse_header(raw: memoryview, total: int, name: str) -> tuple[Header, list[str]]:
    """Parse and check a header. Returns the header and the problems found."""
    if total < 8:
        raise WeightsFormatError(name, [f"not a safetensors file: only {total} bytes"])
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n > MAX_HEADER_BYTES or 8 + n > total:
        raise WeightsFormatError(
            name, [f"not a safetensors file: header length {n} does not fit in {total} bytes"]
        )
    try:
        doc = json.loads(bytes(raw[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsFormatError(name, [f"not a safetensors file: header is not JSON ({exc})"])
    if not isinstance(doc, dict):
        raise WeightsFormatError(name, ["not a safetensors file: header is not a JSON object"])
    problems: list[str] = []
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        problems.append("header '__metadata__' must map strings to strings")
        metadata = {}
    data_len = total - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(shape)
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int)
            ):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {key!r}: malformed header entry {entry!r}")
            continue
        itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else OPAQUE_DTYPES.get(dtype)
        if itemsize is None:
            problems.append(f"tensor {key!r}: unknown dtype {dtype!r}")
            continue
        if not 0 <= begin <= end <= data_len:
            problems.append(
                f"tensor {key!r}: data_offsets [{begin}, {end}] lie outside the "
                f"{data_len}-byte data buffer (file truncated or header lying)"
            )
            continue
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if end - begin != expected:
            problems.append(
                f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} {dtype}, "
                f"expected {expected}"
            )
            continue
        tensors[key] = TensorInfo(key, dtype, shape, begin, end)
    # The buffer must be covered exactly: no overlaps and no gaps.
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < cursor:
            problems.append(f"tensor {info.name!r}: data overlaps the previous tensor")
        elif info.begin > cursor:
            problems.append(f"{info.begin - cursor} unexplained bytes before tensor {info.name!r}")
        cursor = max(cursor, info.end)
    if not problems and cursor != data_len:
        problems.append(f"{data_len - cursor} bytes after the last tensor are unexplained")
    return Header(tensors, metadata, 8 + n), problems


class SafetensorsFile:
    """An opened, header-checked safetensors file or buffer.

    `problems` lists header problems (strict mode raises on them instead).
    `array(name)` returns a zero-copy NumPy view of one tensor.
    """

    def __init__(self, source: PathLike | bytes | bytearray | memoryview, *, strict: bool = True):
        self.name = describe_source(source)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"{self.name}: no such weights file")
            if path.is_dir():
                raise IsADirectoryError(f"{self.name}: is a directory, expected a weights file")
            size = path.stat().st_size
            if size == 0:
                raise WeightsFormatError(self.name, ["not a safetensors file: the file is empty"])
            with open(path, "rb") as fh:
                # Copy-on-write: the arrays are writable, the file is never modified.
                self._buffer: mmap.mmap | memoryview = mmap.mmap(
                    fh.fileno(), 0, access=mmap.ACCESS_COPY
                )
            raw = memoryview(self._buffer)
        else:
            raw = memoryview(source).cast("B")
            self._buffer = raw
        self.header, self.problems = _parse_header(raw, len(raw), self.name)
        self._raw = raw
        if strict and self.problems:
            raise WeightsFormatError(self.name, self.problems)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def array(self, name: str) -> np.ndarray:
        info = self.header.tensors[name]
        if info.dtype not in DTYPES:
            raise WeightsFormatError(self.name, [f"tensor {name!r}: dtype {info.dtype} unsupported"])
        start = self.header.data_start + info.begin
        flat = np.frombuffer(self._raw, dtype=DTYPES[info.dtype],
                             count=(info.end - info.begin) // DTYPES[info.dtype].itemsize,
                             offset=start)
        return flat.reshape(info.shape)


def format_dtype(arr: np.ndarray) -> str:
    """The safetensors name of `arr`'s dtype ("F32", ...), or NumPy's name if it has none."""
    for name, dtype in DTYPES.items():
        if arr.dtype == dtype or arr.dtype == dtype.newbyteorder(">"):
            return name
    return str(arr.dtype)


def _dtype_name(arr: np.ndarray, key: str) -> str:
    name = format_dtype(arr)
    if name not in DTYPES:
        raise TypeError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored")
    return name


def serialize(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Iterator[bytes | np.ndarray]:
    """Yield the file's pieces: header bytes, then each tensor (keys sorted).

    Tensors are made contiguous and little-endian one at a time, so saving a model whose
    parameters are transposed views never holds a second copy of the whole model.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    keys = sorted(arrays)
    offset = 0
    for key in keys:
        arr = arrays[key]
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
        header[key] = {"dtype": _dtype_name(arr, key), "shape": list(arr.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keep the data buffer 8-byte aligned
    yield struct.pack("<Q", len(encoded)) + encoded
    for key in keys:
        arr = np.asarray(arrays[key])
        yield np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def to_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    return b"".join(p if isinstance(p, bytes) else p.data for p in serialize(arrays, metadata))


def save_file(path: PathLike, arrays: Mapping[str, np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
    atomic_write(path, serialize(arrays, metadata))
