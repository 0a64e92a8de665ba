"""Check a weights file the way the chain will load it, and report every problem at once.

`validate(path_or_bytes)` returns a `Report`: errors are what makes the runtime refuse
the file (not safetensors, damaged or lying header, missing keys, wrong shapes, non-float32
dtypes) or what would make its score meaningless (NaN/Inf values); warnings are harmless
(extra keys, which the runtime ignores). Values are scanned through the file's memory map
a chunk at a time, so a full-size V1 file (6.4 GB) is never copied in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from soma_models.errors import WeightsError, WeightsFormatError
from soma_models.safetensors_io import DTYPES, SafetensorsFile, describe_source
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    CANONICAL_DTYPE,
    check_tensors,
    expected_shapes,
    heads_from_metadata,
    infer_config,
)
from soma_models.v1.transit import KeyLike, decrypt_file, decrypt_weights

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


def count_non_finite(array: np.ndarray, chunk_values: int = SCAN_CHUNK_VALUES) -> tuple[int, int]:
    """(number of NaN/Inf values, flat index of the first one or -1), scanned chunk by chunk."""
    flat = array.reshape(-1)
    count, first = 0, -1
    for start in range(0, flat.size, chunk_values):
        bad = ~np.isfinite(flat[start:start + chunk_values])
        n = int(np.count_nonzero(bad))
        if n and first < 0:
            first = start + int(np.argmax(bad))
        count += n
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
        source: object = weights
        if key is not None:
            if isinstance(weights, (str, os.PathLike)):
                if not os.path.exists(weights):
                    raise FileNotFoundError(f"{name}: no such weights file")
                source = decrypt_file(weights, key)
            else:
                source = decrypt_weights(weights, key)
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
    # Scan the values of every expected tensor whose header entry is sound.
    shapes = expected_shapes(config)
    for key_name, shape in shapes.items():
        info = weights_file.tensors.get(key_name)
        if info is None or info.shape != shape or info.dtype not in DTYPES:
            continue
        if info.dtype != CANONICAL_DTYPE and not np.issubdtype(DTYPES[info.dtype], np.floating):
            continue
        count, first = count_non_finite(weights_file.array(key_name))
        if count:
            index = np.unravel_index(first, shape) if shape else ()
            report.errors.append(f"{key_name}: {count} NaN/Inf value(s), first at index "
                                 f"{list(map(int, index))}")
    return report
