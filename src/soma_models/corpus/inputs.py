"""What `prepare` reads: raw files, JSONL, Parquet and Hugging Face `datasets` folders.

* a raw file is one document, its bytes as they are;
* a JSONL file (`.jsonl`, `.ndjson`) is one document per line: the line's `text_field`,
  UTF-8 encoded (blank lines are skipped);
* a Parquet file (`.parquet`) is one document per row: the row's `column`, strings UTF-8
  encoded (Arrow stores them so), binary as it is. Read with pyarrow;
* a folder written by `datasets.Dataset.save_to_disk` (it holds `state.json` and
  `dataset_info.json`) is one document per row of its `column`. Read with `datasets`
  (the optional extra `soma-models[datasets]`).

Folders are walked recursively (names sorted; hidden entries and `__pycache__` skipped),
and their files are classified by extension, so the kinds mix freely. Empty documents are
dropped (and counted).

Readers hand documents to a `sink` in blocks: `sink.write(data)` then
`sink.end_documents(lengths, keys)` for the documents those bytes hold. Arrow columns go
through without a Python loop per row (their offsets and data buffers are used as they
are), which is what makes Parquet fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from soma_models.corpus.layout import CorpusError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KINDS = ("raw", "jsonl", "parquet", "datasets")
_READ_BLOCK = 1 << 24        # raw files are copied in 16 MiB pieces
_JSONL_BLOCK = 4096          # documents per block handed to the sink
_ARROW_BATCH = 16384         # Parquet rows per batch
DATASETS_HINT = "pip install 'soma-models[datasets]'"


class Sink(Protocol):
    def write(self, data: Any) -> None: ...
    def end_documents(self, lengths: np.ndarray, keys: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Source:
    """One input: a file (raw, jsonl, parquet) or a `datasets` folder."""

    path: Path
    kind: str
    name: str        # relative name: the split key comes from it
    size: int        # bytes on disk (planning and the progress bar)
    argument: int    # which SRC argument it came from


def name_key(name: str) -> int:
    """A stable 64-bit number from a name (blake2b; the trainer's raw-file split key)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (a bijection with good avalanche)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(file_key: int, first_row: int, count: int) -> np.ndarray:
    """Split keys of rows `first_row..first_row+count-1` of the file whose key is given."""
    rows = np.arange(first_row, first_row + count, dtype=np.uint64)
    return mix64(rows ^ np.uint64(file_key))


def _kind_of_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "raw"


def _datasets_folder(path: Path) -> bool:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise CorpusError(f"{path}: a Hugging Face DatasetDict (splits: {', '.join(splits)}); "
                          f"give one split's folder, e.g. {path / (splits or ['train'])[0]}")
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def find_sources(paths: list[str | os.PathLike], *, classify: bool = True) -> list[Source]:
    """Every input under `paths`, sorted by name within each argument (see module doc).
    With `classify` False every file is raw and no folder is a `datasets` folder (what the
    trainer's `--data folder/` of raw files means)."""
    if not paths:
        raise CorpusError("no sources given")
    found: list[Source] = []
    for argument, raw in enumerate(paths):
        found.extend(sorted(_sources_of(raw, argument, len(paths), classify),
                            key=lambda s: s.name))
    return found


def _sources_of(raw: str | os.PathLike, argument: int, arguments: int,
                classify: bool) -> list[Source]:
    """The inputs under one argument (in walk order; the caller sorts them by name, so
    that a folder's documents come in the order of their names, as the trainer orders
    raw files)."""
    kind_of = _kind_of_file if classify else (lambda path: "raw")
    found: list[Source] = []
    root = Path(raw)
    if not root.exists():
        raise CorpusError(f"{root}: no such file or folder")
    # Names are relative to the given root (prefixed by its own name when there are
    # several roots), never absolute: split keys must not depend on where data sits.
    prefix = "" if arguments == 1 else f"{root.resolve().name}/"
    if root.is_file():
        found.append(Source(root, kind_of(root), root.name,
                            root.stat().st_size, argument))
        return found
    if classify and _datasets_folder(root):
        size = sum(p.stat().st_size for p in root.glob("*.arrow"))
        found.append(Source(root, "datasets", prefix + root.name, size, argument))
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__pycache__":
                continue
            if classify and _datasets_folder(here / d):
                name = (here / d).relative_to(root).as_posix()
                size = sum(p.stat().st_size for p in (here / d).glob("*.arrow"))
                found.append(Source(here / d, "datasets", prefix + name, size, argument))
            else:
                keep.append(d)
        dirnames[:] = keep
        for filename in sorted(filenames):
            path = here / filename
            if filename.startswith(".") or not path.is_file():
                continue
            name = path.relative_to(root).as_posix()
            found.append(Source(path, kind_of(path), prefix + name,
                                path.stat().st_size, argument))
    return found


# ------------------------------------------------------------------------- readers

def read_raw(source: Source, sink: Sink) -> None:
    """The whole file as one document, copied in pieces (any size, bounded memory)."""
    total = 0
    try:
        with open(source.path, "rb") as fh:
            while piece := fh.read(_READ_BLOCK):
                sink.write(piece)
                total += len(piece)
    except OSError as exc:
        raise CorpusError(f"{source.path}: cannot read ({exc.strerror or exc})") from None
    sink.end_documents(np.array([total], np.int64),
                       np.array([name_key(source.name)], np.uint64))


def read_jsonl(source: Source, sink: Sink, text_field: str) -> None:
    """One document per line: the line's `text_field` (a string), UTF-8 encoded."""
    file_key = name_key(source.name)
    parts: list[bytes] = []
    rows: list[int] = []

    def flush() -> None:
        if parts:
            sink.write(b"".join(parts))
            sink.end_documents(np.fromiter(map(len, parts), np.int64, len(parts)),
                               mix64(np.array(rows, np.uint64) ^ np.uint64(file_key)))
            parts.clear()
            rows.clear()

    try:
        with open(source.path, "rb") as fh:
            for row, line in enumerate(fh):
                if not line.strip():
                    continue
                where = f"{source.path}:{row + 1}"
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise CorpusError(f"{where}: not JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise CorpusError(f"{where}: a JSON {type(record).__name__}, expected an "
                                      f"object with field {text_field!r}")
                if text_field not in record:
                    fields = ", ".join(map(repr, list(record)[:8])) or "none"
                    raise CorpusError(f"{where}: no field {text_field!r} (fields: {fields}); "
                                      f"pass --text-field NAME")
                text = record[text_field]
                if not isinstance(text, str):
                    raise CorpusError(f"{where}: field {text_field!r} is "
                                      f"{'null' if text is None else type(text).__name__}, "
                                      f"expected a string")
                parts.append(text.encode("utf-8"))
                rows.append(row)
                if len(parts) >= _JSONL_BLOCK:
                    flush()
    except OSError as exc:
        raise CorpusError(f"{source.path}: cannot read ({exc.strerror or exc})") from None
    flush()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # a dependency; only a broken install lacks it
        raise CorpusError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def check_column_type(pa: Any, where: str, column: str, arrow_type: Any) -> None:
    t = pa.types
    if not (t.is_string(arrow_type) or t.is_large_string(arrow_type)
            or t.is_binary(arrow_type) or t.is_large_binary(arrow_type)
            or t.is_string_view(arrow_type) or t.is_binary_view(arrow_type)):
        raise CorpusError(f"{where}: column {column!r} holds {arrow_type}, expected strings "
                          f"or bytes")


def write_arrow_column(pa: Any, array: Any, sink: Sink, where: str, column: str,
                       file_key: int, first_row: int) -> None:
    """Rows of one Arrow string/binary array as documents, straight from its buffers."""
    chunks = array.chunks if hasattr(array, "chunks") else [array]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            row = first_row + int(np.flatnonzero(~np.asarray(chunk.is_valid()))[0])
            raise CorpusError(f"{where}: row {row}: column {column!r} is null, expected a "
                              f"string or bytes")
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            # strings are UTF-8 bytes already: a zero-copy view as binary; views -> large
            chunk = chunk.cast(pa.large_binary() if not pa.types.is_string(chunk.type)
                               else pa.binary())
        large = pa.types.is_large_binary(chunk.type)
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, np.int64 if large else np.int32)
        offsets = offsets[chunk.offset:chunk.offset + len(chunk) + 1].astype(np.int64)
        if data_buffer is not None and offsets[-1] > offsets[0]:
            sink.write(memoryview(data_buffer)[int(offsets[0]):int(offsets[-1])])
        sink.end_documents(np.diff(offsets), row_keys(file_key, first_row, len(chunk)))
        first_row += len(chunk)


def parquet_row_groups(source: Source) -> list[tuple[int, int]]:
    """`(rows, bytes)` of each row group of a Parquet file (from its footer only)."""
    pa = _pyarrow()
    try:
        meta = pa.parquet.ParquetFile(source.path).metadata
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{source.path}: not a readable Parquet file ({exc})") from None
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size)
            for i in range(meta.num_row_groups)]


def read_parquet(source: Source, sink: Sink, column: str, groups: tuple[int, int],
                 first_row: int) -> None:
    """Row groups `groups[0]..groups[1]-1` of a Parquet file, one document per row."""
    pa = _pyarrow()
    try:
        file = pa.parquet.ParquetFile(source.path)
        schema = file.schema_arrow
        if column not in schema.names:
            raise CorpusError(f"{source.path}: no column {column!r} (columns: "
                              f"{', '.join(map(repr, schema.names[:8]))}); pass --column NAME")
        check_column_type(pa, str(source.path), column, schema.field(column).type)
        for batch in file.iter_batches(batch_size=_ARROW_BATCH, columns=[column],
                                       row_groups=list(range(*groups)), use_threads=False):
            write_arrow_column(pa, batch.column(0), sink, str(source.path), column,
                               name_key(source.name), first_row)
            first_row += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{source.path}: not a readable Parquet file ({exc})") from None


def load_dataset_folder(source: Source, column: str) -> Any:
    """The `datasets.Dataset` saved in a folder (memory-mapped), its column checked."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{source.path}: a Hugging Face datasets folder; reading it needs "
                          f"the datasets package ({DATASETS_HINT})") from None
    try:
        dataset = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one line each
        raise CorpusError(f"{source.path}: cannot load the datasets folder "
                          f"({' '.join(str(exc).split())})") from None
    if not isinstance(dataset, datasets.Dataset):
        raise CorpusError(f"{source.path}: holds a {type(dataset).__name__}; give one split's "
                          f"folder")
    if column not in dataset.column_names:
        raise CorpusError(f"{source.path}: no column {column!r} (columns: "
                          f"{', '.join(map(repr, dataset.column_names[:8]))}); pass --column "
                          f"NAME")
    pa = _pyarrow()
    check_column_type(pa, str(source.path), column, dataset.data.schema.field(column).type)
    return dataset


def read_dataset_rows(source: Source, sink: Sink, column: str, rows: tuple[int, int]) -> None:
    """Rows `rows[0]..rows[1]-1` of a `datasets` folder's column, one document per row."""
    pa = _pyarrow()
    dataset = load_dataset_folder(source, column).select_columns([column])
    arrow = dataset.with_format("arrow")
    key = name_key(source.name)
    for start in range(rows[0], rows[1], _ARROW_BATCH):
        stop = min(rows[1], start + _ARROW_BATCH)
        table = arrow[start:stop]
        write_arrow_column(pa, table.column(column), sink, str(source.path), column, key,
                           start)
