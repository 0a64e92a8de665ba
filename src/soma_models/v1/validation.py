"""Check a weights file the way the chain will load it, and report every problem at once.

`validate(path_or_bytes, protocol=...)` returns a `Report` that keeps apart:

* `errors`: what makes the runtime of that revision **refuse** the file: not safetensors,
  a layout its parser refuses, a tensor of a dtype it does not map (even an unused one),
  missing keys, wrong shapes, too few layers;
* `caveats`: what it **accepts but scores other than the file suggests**: NaN/Inf values
  (the loss is NaN), layers beyond the revision's count (ignored), non-float32 tensors
  (converted to float32 on load);
* `warnings`: harmless findings: unused keys, duplicated header keys (last entry wins, as
  in the runtime), a width other than the network's, a head count contradicting the file.

Values are scanned through the file a chunk at a time, so a full-size V1 file (4.8 GB)
is never copied in memory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from soma_models.errors import WeightsError, WeightsFormatError
from soma_models.safetensors_io import SafetensorsFile, describe_source, to_float32
from soma_models.v1.configs import (
    V1_EMBEDDING_DIM,
    V1_PWFF_HIDDEN_DIM,
    V1_VOCAB_SIZE,
    ModelConfig,
)
from soma_models.v1.revisions import resolve
from soma_models.v1.schema import (
    check_tensors,
    conversion_note,
    duplicates_note,
    expected_shapes,
    heads_from_metadata,
    heads_note,
    infer_config,
)
from soma_models.v1.sources import check_weights
from soma_models.v1.transit import KeyLike, decrypt_source

# Values checked per step of the NaN/Inf scan (16 M float32 = 64 MB of temporaries).
SCAN_CHUNK_VALUES = 1 << 24
WRONG_KEY_HINT = " (wrong decryption key?)"
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class Report:
    """Outcome of `validate`.

    `ok`: the runtime accepts the file (no errors; caveats and warnings allowed).
    `clean`: accepted, and nothing changes its score from what the file says (no caveats).
    `non_finite`: how many NaN/Inf values the expected tensors hold (after conversion).
    `network_width`: the file has the network's V1 width (embedding 2048, hidden 8192,
    vocab 264). Other widths are checked against their own layout (for experiments); the
    network's runtime, whose sizes are compiled in, would refuse them.
    """

    source: str
    errors: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: ModelConfig | None = None
    protocol: str | None = None
    non_finite: int = 0
    network_width: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def clean(self) -> bool:
        return not self.errors and not self.caveats

    def __str__(self) -> str:
        revision = f" by the runtime of revision {self.protocol}" if self.protocol else ""
        if self.ok:
            head = (f"{self.source}: OK, accepted{revision}" if self.network_width
                    else f"{self.source}: OK for its own layout")
            if self.config is not None:
                c = self.config
                head += (f" (V1 layout: embedding_dim {c.embedding_dim}, {c.num_layers} layers, "
                         f"pwff_hidden_dim {c.pwff_hidden_dim}, vocab {c.vocab_size})")
            if not self.network_width:
                head += (f"; not the network's width ({V1_EMBEDDING_DIM}, {V1_PWFF_HIDDEN_DIM}, "
                         f"{V1_VOCAB_SIZE}), which its runtime requires")
        else:
            head = f"{self.source}: refused{revision}: {len(self.errors)} error(s)"
        lines = [head]
        lines += [f"  error (refused): {e}" for e in self.errors]
        lines += [f"  accepted, but: {c}" for c in self.caveats]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"weights": self.source, "protocol": self.protocol, "ok": self.ok,
                "errors": self.errors, "caveats": self.caveats, "warnings": self.warnings,
                "non_finite": self.non_finite, "network_width": self.network_width}


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


def _layer_count(keys: Iterable[str]) -> int:
    layers = {int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))}
    return max(layers) + 1 if layers else 0


def _check_layers(report: Report, config: ModelConfig, file_layers: int,
                  runtime_layers: int) -> None:
    """Layer count against the revision's runtime (SPEC §1), for full-width files."""
    report.network_width = (config.embedding_dim, config.pwff_hidden_dim,
                            config.vocab_size) == (V1_EMBEDDING_DIM, V1_PWFF_HIDDEN_DIM,
                                                   V1_VOCAB_SIZE)
    if not report.network_width:
        return
    if file_layers < runtime_layers:
        report.errors.append(
            f"{file_layers} layer(s), but revision {report.protocol}'s runtime needs "
            f"{runtime_layers}: it refuses the file (encoder.layers.{file_layers} to "
            f"{runtime_layers - 1} missing)")
    elif file_layers > runtime_layers:
        report.caveats.append(
            f"{file_layers} layers: revision {report.protocol}'s runtime builds "
            f"{runtime_layers} and ignores layers {runtime_layers} to {file_layers - 1} "
            "(their keys are unused)")


def validate(weights: str | os.PathLike | bytes | bytearray | memoryview,
             model_config: ModelConfig | None = None, key: KeyLike | None = None, *,
             protocol: object = None) -> Report:
    """Check weights (path or bytes) as the runtime of revision `protocol` would load them.

    key: AES-256-CTR key when the weights are encrypted in transit.
    model_config: the layout to check against; None infers the sizes from the shapes
        (heads from the file's metadata, else V1's 8).
    protocol: revision name ("0.1.1", "0.1.7", "latest"); None is the process-wide one.
        A full-width file needs at least its runtime's layer count; more are ignored.
    """
    check_weights(weights, ("path", "bytes"))
    revision = resolve(protocol)
    name = describe_source(weights)
    report = Report(name, protocol=revision.name)
    hint = WRONG_KEY_HINT if key is not None else ""
    try:
        source = decrypt_source(weights, key)
        weights_file = SafetensorsFile(source, strict=False)  # type: ignore[arg-type]
    except WeightsFormatError as exc:
        report.errors += [p + hint for p in exc.problems]
        return report
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        report.errors.append(str(exc))
        return report
    report.errors += [p + hint for p in weights_file.problems]
    if weights_file.duplicates:
        report.warnings.append(duplicates_note(weights_file.duplicates))
    found = {k: (info.dtype, info.shape) for k, info in weights_file.tensors.items()}
    config = model_config
    if config is None:
        try:
            config = infer_config({k: s for k, (_, s) in found.items()}, source=name,
                                  num_heads=heads_from_metadata(weights_file.metadata))
        except WeightsError as exc:
            report.errors += [p + hint for p in exc.problems]
            return report
    elif (note := heads_note(config, weights_file.metadata)) is not None:
        report.warnings.append(note)
    report.config = config
    check = check_tensors(found, config)
    report.errors += check.errors
    report.warnings += check.warnings
    if check.converted:
        report.caveats.append(conversion_note(check.converted))
    try:
        config.require_contract_vocab()
    except ValueError as exc:
        report.errors.append(str(exc))
    _check_layers(report, config, _layer_count(found), revision.num_layers)
    if not weights_file.problems:
        _scan_values(report, weights_file, source, config)
    return report


def _scan_values(report: Report, weights_file: SafetensorsFile, source: object,
                 config: ModelConfig) -> None:
    """Count NaN/Inf values of every expected floating tensor whose entry is sound, after
    the runtime's float32 conversion (an F64 value beyond float32's range becomes Inf):
    from the file itself for a path, from the (decrypted) buffer otherwise."""
    with contextlib.ExitStack() as stack:
        from_file = (stack.enter_context(open(source, "rb"))  # type: ignore[arg-type]
                     if isinstance(source, (str, os.PathLike)) else None)
        for key_name, shape in expected_shapes(config).items():
            info = weights_file.tensors.get(key_name)
            if info is None or info.shape != shape or info.dtype not in _FLOAT_DTYPES:
                continue
            stored = weights_file.storage(key_name).dtype
            if from_file is not None:
                chunks: Iterable[np.ndarray] = file_chunks(
                    from_file, weights_file.header.data_start + info.begin,
                    (info.end - info.begin) // stored.itemsize, stored)
            else:
                chunks = array_chunks(weights_file.storage(key_name))
            count, first = count_non_finite(to_float32(c, info.dtype) for c in chunks)
            if count:
                index = np.unravel_index(first, shape) if shape else ()
                report.non_finite += count
                report.caveats.append(
                    f"{key_name}: {count} NaN/Inf value(s) (as float32), first at index "
                    f"{list(map(int, index))}: the loss will be NaN")
