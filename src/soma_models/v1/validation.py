"""Check a weights file the way the chain will load it, and report every problem at once.

`validate(path_or_bytes)` returns a `Report`: errors are what makes the runtime refuse
the file (not safetensors, damaged or lying header, missing keys, wrong shapes, non-float32
dtypes) or what would make its score meaningless (NaN/Inf values); warnings are harmless
(extra keys, which the runtime ignores). Values are scanned through the file's memory map
a chunk at a time, so a full-size V1 file (6.4 GB) is never copied in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from soma_models.errors import WeightsError, WeightsFormatError
from soma_models.safetensors_io import DTYPES, SafetensorsFile, describe_source
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    check_tensors,
    expected_shapes,
    heads_from_metadata,
    infer_config,
)
from soma_models.v1.transit import KeyLike, decrypt_source

# Values checked per step of the NaN/Inf scan (16 M float32 = 64 MB of temporaries).
SCAN_CHUNK_VALUES = 1 << 24


@dataclass
class Report:
    """Outcome of `validate`. `ok` is True when there are no errors (warnings allowed)."""

    source: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: ModelConfig | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        if self.ok:
            head = f"{self.source}: OK"
            if self.config is not None:
                c = self.config
                head += (f" (V1 layout: embedding_dim {c.embedding_dim}, {c.num_layers} layers, "
                         f"pwff_hidden_dim {c.pwff_hidden_dim}, vocab {c.vocab_size})")
        else:
            head = f"{self.source}: {len(self.errors)} error(s)"
        lines = [head]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def array_chunks(array: np.ndarray, chunk_values: int = SCAN_CHUNK_VALUES) -> Iterator[np.ndarray]:
    """Flat views of an in-memory array, `chunk_values` values at a time."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, chunk_values):
        yield flat[start:start + chunk_values]


def file_chunks(fh: BinaryIO, offset: int, count: int, dtype: np.dtype,
                chunk_values: int = SCAN_CHUNK_VALUES) -> Iterator[np.ndarray]:
    """`count` values of `dtype` read from `fh` at `offset`, into one reused buffer.

    Reading (rather than touching a memory map) keeps the scan's resident memory at one
    chunk: the file's pages stay in the page cache, not in the process.
    """
    buffer = np.empty(min(count, chunk_values), dtype=dtype)
    fh.seek(offset)
    for start in range(0, count, chunk_values):
        view = buffer[:min(chunk_values, count - start)]
        if fh.readinto(memoryview(view).cast("B")) != view.nbytes:
            raise OSError("file shorter than its header says")
        yield view


def count_non_finite(chunks: Iterable[np.ndarray]) -> tuple[int, int]:
    """(number of NaN/Inf values, flat index of the first one or -1) over consecutive chunks."""
    count, first, seen = 0, -1, 0
    for chunk in chunks:
        bad = ~np.isfinite(chunk)
        n = int(np.count_nonzero(bad))
        if n and first < 0:
            first = seen + int(np.argmax(bad))
        count += n
        seen += chunk.size
    return count, first


def validate(weights: str | os.PathLike | bytes | bytearray | memoryview,
             model_config: ModelConfig | None = None, key: KeyLike | None = None) -> Report:
    """Check weights (path or bytes; `key` decrypts AES-256-CTR transit encryption).

    With `model_config=None` the sizes are inferred from the shapes (heads from the file's
    metadata, else V1's), and the file is checked against that layout.
    """
    name = describe_source(weights)
    report = Report(name)
    try:
        source = decrypt_source(weights, key)
        weights_file = SafetensorsFile(source, strict=False)  # type: ignore[arg-type]
    except WeightsFormatError as exc:
        hint = " (wrong decryption key?)" if key is not None else ""
        report.errors += [p + hint for p in exc.problems]
        return report
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        report.errors.append(str(exc))
        return report
    report.errors += weights_file.problems
    found = {k: (info.dtype, info.shape) for k, info in weights_file.tensors.items()}
    config = model_config
    if config is None:
        try:
            config = infer_config({k: s for k, (_, s) in found.items()}, source=name,
                                  num_heads=heads_from_metadata(weights_file.metadata))
        except WeightsError as exc:
            report.errors += exc.problems
            return report
    report.config = config
    check = check_tensors(found, config)
    report.errors += check.errors
    report.warnings += check.warnings
    try:
        config.require_contract_vocab()
    except ValueError as exc:
        report.errors.append(str(exc))
    # Scan the values of every expected tensor whose header entry is sound: from the file
    # itself for a path, from the (decrypted) buffer otherwise.
    with contextlib.ExitStack() as stack:
        from_file = (stack.enter_context(open(source, "rb"))
                     if isinstance(source, (str, os.PathLike)) else None)
        for key_name, shape in expected_shapes(config).items():
            info = weights_file.tensors.get(key_name)
            if info is None or info.shape != shape or info.dtype not in DTYPES:
                continue
            dtype = DTYPES[info.dtype]
            if not np.issubdtype(dtype, np.floating):
                continue
            if from_file is not None:
                chunks = file_chunks(from_file, weights_file.header.data_start + info.begin,
                                     (info.end - info.begin) // dtype.itemsize, dtype)
            else:
                chunks = array_chunks(weights_file.array(key_name))
            count, first = count_non_finite(chunks)
            if count:
                index = np.unravel_index(first, shape) if shape else ()
                report.errors.append(f"{key_name}: {count} NaN/Inf value(s), first at index "
                                     f"{list(map(int, index))}")
    return report
