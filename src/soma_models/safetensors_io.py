"""Safetensors in and out, framework-free: the package's one header reader and its writer.

Format: 8 bytes little-endian u64 `N`, then `N` bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer; offsets are relative to the buffer's start.

Whether a file is acceptable at the format level is decided by the `safetensors` package,
the Python binding of the Rust crate the network's runtime parses with, so what we accept
and refuse there is by construction what the runtime does (a header no longer than the
file; byte ranges contiguous, non-overlapping and covering the buffer; each range's length
equal to shape x dtype size, without overflow; a key given twice is taken last-wins).
Our own pass over the same header then explains *every* problem at once, naming the
tensor and what was expected versus found, and records duplicated keys.

Tensors come back as NumPy arrays that are views into one buffer: a copy-on-write memory
map for files (nothing is read twice; pages are read on first touch), or the caller's
bytes. `SafetensorsFile.float32` converts other dtypes exactly as the runtime does.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from soma_models.atomic import atomic_write
from soma_models.errors import WeightsFormatError

#: The format's dtypes that NumPy reads directly.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
#: Every dtype the format knows, with its size in bits (F4/F6 are packed below a byte).
DTYPE_BITS: dict[str, int] = {
    **{name: dtype.itemsize * 8 for name, dtype in DTYPES.items()},
    "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
#: Dtypes `SafetensorsFile.float32` converts (the ones the V1 runtime maps, SPEC §4).
FLOAT32_CONVERTIBLE = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32",
                       "U8", "BOOL")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_U64_LIMIT = 1 << 64

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
    #: Keys that appear more than once in the header JSON (the last entry is used).
    duplicates: dict[str, int] = field(default_factory=dict)


def describe_source(source: PathLike | bytes | bytearray | memoryview) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"


def _crate_verdict(path: PathLike | None, header: bytes, total: int) -> str | None:
    """None when the `safetensors` crate accepts the layout, else its error message.

    The crate only needs the header and the file's length to decide, so bytes are
    checked through a sparse stand-in file (the header, then a hole of the buffer's size).
    """
    from safetensors import SafetensorError, safe_open

    def open_with_crate(target: PathLike) -> str | None:
        try:
            with safe_open(os.fspath(target), framework="numpy"):
                return None
        except SafetensorError as exc:
            return str(exc).removeprefix("Error while deserializing header: ")

    if path is not None:
        return open_with_crate(path)
    with tempfile.NamedTemporaryFile(prefix="soma-models-header-", suffix=".safetensors") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(total)
        fh.flush()
        return open_with_crate(fh.name)


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64_LIMIT


def _entry_problems(key: str, entry: object) -> tuple[TensorInfo | None, list[str]]:
    """Check one header entry's fields; returns the entry (when well-formed) and problems."""
    if not isinstance(entry, dict):
        return None, [f"tensor {key!r}: header entry must be an object, found {entry!r}"]
    problems = []
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        problems.append(f"tensor {key!r}: header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if "dtype" in entry and not isinstance(dtype, str):
        problems.append(f"tensor {key!r}: dtype must be a string, found {dtype!r}")
    elif isinstance(dtype, str) and dtype not in DTYPE_BITS:
        problems.append(f"tensor {key!r}: unknown dtype {dtype!r} (known: "
                        f"{', '.join(DTYPE_BITS)})")
    if "shape" in entry and not (isinstance(shape, list) and all(map(_is_u64, shape))):
        problems.append(f"tensor {key!r}: shape must be a list of integers in [0, 2^64), "
                        f"found {shape!r}")
    if "data_offsets" in entry and not (isinstance(offsets, list) and len(offsets) == 2
                                        and all(map(_is_u64, offsets))):
        problems.append(f"tensor {key!r}: data_offsets must be two integers in [0, 2^64), "
                        f"found {offsets!r}")
    if problems:
        return None, problems
    return TensorInfo(key, dtype, tuple(shape), offsets[0], offsets[1]), []


def _layout_problems(tensors: dict[str, TensorInfo], data_len: int,
                     coverage: bool = True) -> list[str]:
    """Byte sizes, bounds and (when every entry was readable) coverage of the buffer."""
    problems = []
    placed = []
    for info in tensors.values():
        values = math.prod(info.shape)
        bits = values * DTYPE_BITS[info.dtype]
        if bits >= _U64_LIMIT * 8 or values >= _U64_LIMIT:
            problems.append(f"tensor {info.name!r}: shape {list(info.shape)} {info.dtype} is "
                            f"too large: its byte size overflows a 64-bit integer")
            continue
        if not info.begin <= info.end <= data_len:
            problems.append(f"tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] lie "
                            f"outside the {data_len}-byte data buffer (file truncated or header "
                            "lying)")
            continue
        expected = (bits + 7) // 8
        if info.end - info.begin != expected:
            problems.append(f"tensor {info.name!r}: {info.end - info.begin} bytes for shape "
                            f"{list(info.shape)} {info.dtype}, expected {expected}")
            continue
        placed.append(info)
    if not coverage:  # a malformed entry's bytes would show up as a gap: say nothing
        return problems
    # The buffer must be covered exactly: no overlaps and no gaps.
    cursor = 0
    for info in sorted(placed, key=lambda t: (t.begin, t.end)):
        if info.begin < cursor:
            problems.append(f"tensor {info.name!r}: data overlaps the previous tensor")
        elif info.begin > cursor:
            problems.append(f"{info.begin - cursor} unexplained bytes before tensor {info.name!r}")
        cursor = max(cursor, info.end)
    if not problems and cursor != data_len:
        problems.append(f"{data_len - cursor} bytes after the last tensor are unexplained")
    return problems


def _parse_header(raw: memoryview, total: int, name: str,
                  path: PathLike | None) -> tuple[Header, list[str]]:
    """Parse a header; returns it and the problems that make the crate refuse the file."""
    if total < 8:
        raise WeightsFormatError(name, [f"not a safetensors file: only {total} bytes"])
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n > MAX_HEADER_BYTES or 8 + n > total:
        raise WeightsFormatError(
            name, [f"not a safetensors file: header length {n} does not fit in {total} bytes"]
        )
    header_bytes = bytes(raw[8 : 8 + n])
    counts: dict[str, int] = {}

    def last_wins(pairs: list[tuple[str, object]]) -> dict[str, object]:
        doc: dict[str, object] = {}
        for key, value in pairs:
            doc[key] = value
        if len(doc) < len(pairs):  # only the top level holds many keys; tensors' fields too
            for key, _ in pairs:
                counts[key] = counts.get(key, 0) + 1
        return doc

    try:
        doc = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=last_wins)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WeightsFormatError(name, [f"not a safetensors file: header is not JSON ({exc})"])
    if not isinstance(doc, dict):
        raise WeightsFormatError(name, ["not a safetensors file: header is not a JSON object"])
    duplicates = {k: c for k, c in counts.items() if c > 1 and k in doc}
    problems: list[str] = []
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        problems.append("header '__metadata__' must map strings to strings")
        metadata = {}
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        info, entry_problems = _entry_problems(key, entry)
        problems += entry_problems
        if info is not None:
            tensors[key] = info
    data_len = total - 8 - n
    problems += _layout_problems(tensors, data_len, coverage=not problems)
    verdict = _crate_verdict(path, header_bytes, total)
    if verdict is None:
        # The crate accepts it, so the runtime parses it: the layout is sound.
        problems = []
    else:
        problems.append(f"the safetensors parser (the runtime's) refuses it: {verdict}")
    return Header(tensors, metadata, 8 + n, duplicates), problems


def header_length(first_bytes: bytes) -> int:
    """The header length `N` announced by a file's first 8 bytes."""
    if len(first_bytes) < 8:
        raise ValueError("fewer than 8 bytes")
    return struct.unpack("<Q", first_bytes[:8])[0]


def read_header(path: PathLike, *,
                decode: Callable[[bytes], bytes] | None = None) -> tuple[Header, list[str]]:
    """Read only a file's header (its first 8 + N bytes) and check it against the file's size.

    decode: applied to the bytes read from the start of the file (e.g. a stream cipher's
        decryption, whose output at offset 0 does not depend on what follows).
    Returns the header and the problems that make the runtime's parser refuse the file;
    raises `WeightsFormatError` when it is not safetensors at all, FileNotFoundError /
    IsADirectoryError naming the path.
    """
    name = os.fspath(path)
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{name}: is a directory, expected a weights file")
    if not file.exists():
        raise FileNotFoundError(f"{name}: no such weights file")
    total = file.stat().st_size

    def read(fh: BinaryIO, count: int) -> bytes:
        fh.seek(0)
        raw = fh.read(count)
        return raw if decode is None else decode(raw)

    with open(file, "rb") as fh:
        first = read(fh, 8)
        if len(first) == 8:
            n = header_length(first)
            if n <= MAX_HEADER_BYTES and 8 + n <= total:
                first = read(fh, 8 + n)
    return _parse_header(memoryview(first), total, name, path if decode is None else None)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their uint16 bit patterns, widened exactly to float32."""
    return (np.asarray(bits, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of `dtype` (as `SafetensorsFile.storage` returns them) as float32, the
    way the runtime converts on load (SPEC §4): F64 rounds to nearest (overflow gives
    +-Inf), F16/BF16 widen exactly, integers convert by value (rounding to nearest when
    above 2^24), BOOL gives 0/1. F32 comes back unchanged (a view)."""
    if dtype == "F32":
        return values
    if dtype == "BF16":
        return bfloat16_to_float32(values)
    if dtype == "BOOL":
        return (values.view(np.uint8) != 0).astype(np.float32)
    if dtype not in FLOAT32_CONVERTIBLE:
        raise ValueError(f"dtype {dtype} has no float32 conversion")
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def _storage_dtype(dtype: str) -> np.dtype | None:
    if dtype in DTYPES:
        return np.dtype("u1") if dtype == "BOOL" else DTYPES[dtype]
    if dtype == "BF16":
        return np.dtype("<u2")
    return None


class SafetensorsFile:
    """An opened, header-checked safetensors file or buffer.

    `problems` lists what makes the runtime's parser refuse the file (strict mode raises
    on them instead); `duplicates` the keys given more than once (last entry used).
    `array(name)` returns a zero-copy NumPy view of one tensor; `float32(name)` its values
    converted to float32 as the runtime does (a view for F32 tensors).
    """

    def __init__(self, source: PathLike | bytes | bytearray | memoryview, *, strict: bool = True):
        self.name = describe_source(source)
        path = None
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
        self.header, self.problems = _parse_header(raw, len(raw), self.name, path)
        self._raw = raw
        if strict and self.problems:
            raise WeightsFormatError(self.name, self.problems)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def duplicates(self) -> dict[str, int]:
        return self.header.duplicates

    def storage(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's stored values (BF16 as uint16 bits, BOOL as uint8)."""
        info = self.header.tensors[name]
        dtype = _storage_dtype(info.dtype)
        if dtype is None:
            raise WeightsFormatError(self.name,
                                     [f"tensor {name!r}: dtype {info.dtype} cannot be read"])
        count = (info.end - info.begin) // dtype.itemsize
        flat = np.frombuffer(self._raw, dtype=dtype, count=count,
                             offset=self.header.data_start + info.begin)
        return flat.reshape(info.shape)

    def array(self, name: str) -> np.ndarray:
        info = self.header.tensors[name]
        if info.dtype not in DTYPES:
            problem = f"tensor {name!r}: dtype {info.dtype} has no NumPy equivalent (use float32())"
            raise WeightsFormatError(self.name, [problem])
        return self.storage(name).view(DTYPES[info.dtype])

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32, converted as the runtime converts it (see `to_float32`)."""
        return to_float32(self.storage(name), self.header.tensors[name].dtype)


def format_dtype(arr: np.ndarray) -> str:
    """The safetensors name of `arr`'s dtype ("F32", ...), or NumPy's name if it has none."""
    if arr.dtype.name == "bfloat16":  # ml_dtypes' (JAX's) bfloat16
        return "BF16"
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
