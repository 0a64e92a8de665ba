"""`prepare`: raw files, JSONL, Parquet and `datasets` folders -> a corpus the trainer maps.

    from soma_models.corpus import prepare
    result = prepare(["crawl/", "code.parquet"], "corpus/", column="content")

The inputs (`soma_models.corpus.inputs`) are cut into *units* of about `shard_bytes` of
input (consecutive raw files; a Parquet file's row groups; a `datasets` folder's rows;
a JSONL file), and each unit becomes one shard, written by a pool of `workers`
processes. Document order is the inputs' order, whatever the pool's. The workers are
spawned (not forked), so a script that calls `prepare` with several workers needs the
usual `if __name__ == "__main__":` guard.

Whole or nothing: everything is written into a hidden temporary folder next to the output
(`soma_models.atomic.staging`), the manifest last, and the folder is renamed onto the
output only when every shard is written, hashed (SHA-256) and synced. An error, Ctrl-C or SIGTERM
removes the temporary folder; a killed (SIGKILL) prepare leaves one that the next writer
into the same folder removes. So a rerun with the same arguments starts over cleanly, and
no folder that looks like a corpus is ever incomplete. An existing output is replaced
only with `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soma_models.atomic import atomic_write, staging
from soma_models.corpus import inputs
from soma_models.corpus.inputs import Source
from soma_models.corpus.layout import (
    FORMAT,
    KEY_DTYPE,
    LAYOUT_VERSION,
    MANIFEST,
    OFFSET_DTYPE,
    SHARD_FILES,
    SPLIT_RULE,
    CorpusError,
    is_corpus,
    shard_path,
)

DEFAULT_SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class Unit:
    """The input of one shard: raw files, or a slice of one Parquet file or `datasets`
    folder (`part`: row groups or rows; `first_row`: the row number `part` starts at)."""

    kind: str
    sources: tuple[Source, ...]
    size: int
    part: tuple[int, int] = (0, 0)
    first_row: int = 0


@dataclass
class PrepareResult:
    out: Path
    documents: int
    bytes: int
    shards: int
    empty_skipped: int
    input_bytes: int
    seconds: float
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def input_rate(self) -> float:
        """Input bytes read per second."""
        return self.input_bytes / max(self.seconds, 1e-9)


def plan_units(sources: list[Source], column: str, shard_bytes: int) -> list[Unit]:
    """Cut the inputs into units of about `shard_bytes` (see the module docstring)."""
    units: list[Unit] = []
    raw: list[Source] = []
    raw_bytes = 0

    def flush_raw() -> None:
        nonlocal raw_bytes
        if raw:
            units.append(Unit("raw", tuple(raw), raw_bytes))
            raw.clear()
            raw_bytes = 0

    for source in sources:
        if source.kind == "raw":
            raw.append(source)
            raw_bytes += source.size
            if raw_bytes >= shard_bytes:
                flush_raw()
            continue
        flush_raw()
        if source.kind == "jsonl":
            units.append(Unit("jsonl", (source,), source.size))
        elif source.kind == "parquet":
            start = row = size = rows_here = 0
            groups = inputs.parquet_row_groups(source)
            for index, (rows, nbytes) in enumerate(groups):
                size += nbytes
                rows_here += rows
                if size >= shard_bytes or index == len(groups) - 1:
                    units.append(Unit("parquet", (source,), size, (start, index + 1), row))
                    start, row, size, rows_here = index + 1, row + rows_here, 0, 0
        else:
            dataset = inputs.load_dataset_folder(source, column)
            rows, nbytes = len(dataset), max(1, dataset.data.nbytes)
            pieces = max(1, min(rows, -(-nbytes // shard_bytes)))
            bounds = np.linspace(0, rows, pieces + 1).astype(np.int64)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b > a:
                    units.append(Unit("datasets", (source,), int(nbytes * (b - a) // rows),
                                      (int(a), int(b)), int(a)))
    flush_raw()
    return units


class ShardWriter:
    """Writes one shard's files: bytes as they come, the index and keys at the end."""

    def __init__(self, folder: Path, index: int):
        self.folder, self.index = folder, index
        self.bin_path = shard_path(folder, index, "bin")
        self._fh = open(self.bin_path, "xb")  # noqa: SIM115 - closed in finish()
        self._hash = hashlib.sha256()
        self._pending = 0
        self._lengths: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self.empty_skipped = 0

    def write(self, data: Any) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self._pending += memoryview(data).nbytes

    def end_documents(self, lengths: np.ndarray, keys: np.ndarray) -> None:
        """The documents whose bytes were written since the last call (empty ones dropped)."""
        if int(lengths.sum()) != self._pending:
            raise RuntimeError(f"shard {self.index}: {self._pending} bytes written, documents "
                               f"of {int(lengths.sum())}")
        self._pending = 0
        keep = lengths > 0
        self.empty_skipped += int(np.count_nonzero(~keep))
        self._lengths.append(lengths[keep].astype(OFFSET_DTYPE))
        self._keys.append(keys[keep].astype(KEY_DTYPE))

    def close(self) -> None:
        self._fh.close()

    def finish(self) -> dict[str, Any] | None:
        """Sync and describe the shard; None (and nothing left behind) if it holds nothing."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
        if len(lengths) == 0:
            self.bin_path.unlink()
            return None
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(OFFSET_DTYPE)
        keys = np.concatenate(self._keys)
        digests = {"bin": self._hash.hexdigest()}
        for kind, array in (("idx", offsets), ("key", keys)):
            atomic_write(shard_path(self.folder, self.index, kind), [array])
            digests[kind] = hashlib.sha256(array.tobytes()).hexdigest()
        return {"documents": len(lengths), "bytes": int(offsets[-1]), "sha256": digests,
                "empty_skipped": self.empty_skipped}


def write_unit(index: int, unit: Unit, folder: Path, text_field: str,
               column: str) -> dict[str, Any] | None:
    """Read one unit and write it as shard `index` of `folder` (runs in a worker)."""
    writer = ShardWriter(folder, index)
    try:
        for source in unit.sources:
            if unit.kind == "raw":
                inputs.read_raw(source, writer)
            elif unit.kind == "jsonl":
                inputs.read_jsonl(source, writer, text_field)
            elif unit.kind == "parquet":
                inputs.read_parquet(source, writer, column, unit.part, unit.first_row)
            else:
                inputs.read_dataset_rows(source, writer, column, unit.part)
    except BaseException:
        writer.close()  # the temporary folder holding it goes as a whole
        raise
    return writer.finish()


def _summaries(paths: list[str | os.PathLike], sources: list[Source], units: list[Unit],
               infos: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Per SRC argument: its path, kinds of inputs, documents and bytes taken."""
    out = [{"path": str(p), "inputs": {}, "documents": 0, "bytes": 0} for p in paths]
    for source in sources:
        kinds = out[source.argument]["inputs"]
        kinds[source.kind] = kinds.get(source.kind, 0) + 1
    for unit, info in zip(units, infos, strict=True):
        if info is not None:  # a unit never spans two arguments' sources
            entry = out[unit.sources[0].argument]
            entry["documents"] += info["documents"]
            entry["bytes"] += info["bytes"]
    return out


def prepare(paths: list[str | os.PathLike], out: str | os.PathLike, *, text_field: str = "text",
            column: str = "text", workers: int | None = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
            progress: bool = False) -> PrepareResult:
    """Turn `paths` into the corpus folder `out` (see the module docstring)."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        what = "a corpus" if is_corpus(out) else "files"
        raise CorpusError(f"-o {out}: already holds {what}; pass --overwrite to replace it, "
                          f"or choose another folder")
    if shard_bytes < 1:
        raise CorpusError(f"shard_bytes must be >= 1, got {shard_bytes}")
    sources = inputs.find_sources(list(paths))
    units = plan_units(sources, column, shard_bytes)
    if not units:
        raise CorpusError(f"{', '.join(map(str, paths))}: no inputs found")
    workers = max(1, min(workers or os.cpu_count() or 1, len(units)))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True,
                   dynamic_ncols=True, file=sys.stderr, desc="prepare")
    try:
        with staging(out, directory=True) as tmp:
            infos = _write_units(units, tmp, text_field, column, workers, bar)
            kept = [(i, info) for i, info in enumerate(infos) if info is not None]
            if not kept:
                raise CorpusError(f"{', '.join(map(str, paths))}: no documents ("
                                  f"{len(sources)} input(s), every document empty)")
            for new, (old, _) in enumerate(kept):  # shard numbers without gaps
                if new != old:
                    for kind in SHARD_FILES:
                        os.replace(shard_path(tmp, old, kind), shard_path(tmp, new, kind))
            summaries = _summaries(paths, sources, units, infos)
            manifest = {
                "format": FORMAT, "layout_version": LAYOUT_VERSION,
                "documents": sum(info["documents"] for _, info in kept),
                "bytes": sum(info["bytes"] for _, info in kept),
                "empty_documents_skipped": sum(info["empty_skipped"] for _, info in kept),
                "index": {"offsets": OFFSET_DTYPE.str, "keys": KEY_DTYPE.str},
                "split": SPLIT_RULE,
                "options": {"text_field": text_field, "column": column},
                "sources": summaries,
                "shards": [{k: info[k] for k in ("documents", "bytes", "sha256")}
                           for _, info in kept],
            }
            atomic_write(tmp / MANIFEST, [json.dumps(manifest, indent=1).encode()])
    finally:
        if bar is not None:
            bar.close()
    return PrepareResult(out, manifest["documents"], manifest["bytes"], len(kept),
                         manifest["empty_documents_skipped"], sum(u.size for u in units),
                         time.perf_counter() - started, summaries)


def _write_units(units: list[Unit], folder: Path, text_field: str, column: str, workers: int,
                 bar: Any) -> list[dict[str, Any] | None]:
    if workers == 1:
        infos = []
        for index, unit in enumerate(units):
            infos.append(write_unit(index, unit, folder, text_field, column))
            if bar is not None:
                bar.update(unit.size)
        return infos
    # Spawned, not forked: the caller may run threads (JAX, torch) that a fork would copy
    # mid-lock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(write_unit, index, unit, folder, text_field, column)
                   for index, unit in enumerate(units)]
        try:
            infos = []
            for unit, future in zip(units, futures, strict=True):  # in order: first error first
                infos.append(future.result())
                if bar is not None:
                    bar.update(unit.size)
            return infos
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
