"""The corpus layout on disk, and its reader: shards of document bytes, memory-mapped.

A corpus folder (written by `soma_models.corpus.prepare`) holds::

    soma-corpus.json        the manifest (written last; see below)
    shard-00000.bin         the documents' bytes, back to back, nothing in between
    shard-00000.idx         little-endian int64 [documents + 1]: document i is bytes
                            idx[i]:idx[i+1] of the .bin (idx[0] = 0, idx[-1] = .bin size)
    shard-00000.key         little-endian uint64 [documents]: each document's split key
    shard-00001.bin ...

The manifest records the layout version, the document and byte counts (total and per
shard), the SHA-256 of every shard file, the split rule and the sources. Why `.bin`
plus an offset index rather than Arrow IPC: the trainer needs exactly one thing, the bytes
of document i from offset a to b, and `np.memmap` gives that with no copy and no
dependency but NumPy (which a Flax or a torch trainer has anyway); the index is the
Megatron-LM / nanoGPT layout people already know, and the files are readable with any
tool. pyarrow is used where it belongs, reading the inputs (Parquet, Arrow).

Split keys. Each document carries a 64-bit key fixed when it is prepared; split rule
"file" holds a document out when `key / 2**64 < val_fraction`, so the held-out set is
stable whatever the trainer's sequence length, and a document keeps its side when others
are added. A raw file's key is the blake2b of its relative name (the same number the
trainer has always used for raw folders); a JSONL line's or Parquet row's key mixes its
file's key with its row number.

Opening checks every file's size against the manifest and the (small) index and key
files against their hashes, and refuses another layout version; `Corpus.verify()`
(`soma-models prepare --verify`) also hashes the document bytes, which takes a pass over
the whole corpus and is therefore not done at every open.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "soma-corpus.json"
FORMAT = "soma-models corpus"
LAYOUT_VERSION = 1
OFFSET_DTYPE = np.dtype("<i8")
KEY_DTYPE = np.dtype("<u8")
SHARD_FILES = ("bin", "idx", "key")
SPLIT_RULE = ("rule 'file': a document is held out when its key / 2**64 < val_fraction "
              "(at least one document on each side); rule 'bytes': the last val_fraction "
              "of every document's bytes is held out")
_HASH_BLOCK = 1 << 22


class CorpusError(ValueError):
    """Data that cannot be used: a missing path or field, a bad row, an empty, damaged or
    foreign corpus. The message is one line naming the file and the problem."""


def shard_path(folder: Path, index: int, kind: str) -> Path:
    return folder / f"shard-{index:05d}.{kind}"


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in blocks (never mapped, so it adds nothing to RSS).

    SHA-256 rather than blake2b: CPUs with SHA extensions hash it about twice as fast
    (measured 660 vs 370 MB/s here), and every shard byte passes through it in `prepare`.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _map_random(path: Path) -> mmap.mmap:
    """A read-only map of a whole file, for random access.

    MADV_RANDOM turns off the kernel's read-ahead around each page fault: training reads
    rows of a few hundred bytes at random places, and the default read-ahead (often 128
    KiB to 8 MiB per fault) would read, and keep in the page cache, far more than is used.
    """
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def is_corpus(path: str | os.PathLike) -> bool:
    """Whether `path` is a corpus folder (it holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class Shard:
    """One shard as the manifest describes it."""

    index: int
    documents: int
    bytes: int
    sha256: dict[str, str]  # file kind ("bin", "idx", "key") -> hex digest

    def sizes(self) -> dict[str, int]:
        """The size each of the shard's files must have."""
        return {"bin": self.bytes, "idx": (self.documents + 1) * OFFSET_DTYPE.itemsize,
                "key": self.documents * KEY_DTYPE.itemsize}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorpusError(f"{folder}: not a corpus (no {MANIFEST}); make one with "
                          f"`soma-models prepare SRC... -o {folder}`") from None
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: not a soma-models corpus manifest")
    version = manifest.get("layout_version")
    if version != LAYOUT_VERSION:
        raise CorpusError(f"{path}: corpus layout version {version!r}, this soma-models reads "
                          f"version {LAYOUT_VERSION}; prepare the corpus again with it")
    return manifest


class Corpus:
    """A prepared corpus, memory-mapped: `len(corpus)` documents, `corpus.document(i)` the
    bytes of document i as a read-only uint8 array view (no copy, nothing read until used).

    Resident memory does not grow with the corpus: the shard files are mapped, not read,
    and only the pages of the documents actually used are ever touched.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        try:
            self.shards = [Shard(i, int(s["documents"]), int(s["bytes"]), dict(s["sha256"]))
                           for i, s in enumerate(self.manifest["shards"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorpusError(f"{self.folder / MANIFEST}: malformed shard list ({exc})") from None
        self._check_files()
        counts = [s.documents for s in self.shards]
        self.num_documents = int(sum(counts))
        self.num_bytes = int(sum(s.bytes for s in self.shards))
        if self.num_documents == 0:
            raise CorpusError(f"{self.folder}: the corpus holds no documents")
        #: document i lives in shard s when first_document[s] <= i < first_document[s + 1]
        self.first_document = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._maps = [_map_random(shard_path(self.folder, s.index, "bin")) for s in self.shards]
        self._bins = [np.frombuffer(m, np.uint8) for m in self._maps]
        self._offsets = [np.memmap(shard_path(self.folder, s.index, "idx"), OFFSET_DTYPE, "r")
                         for s in self.shards]
        self._keys = [np.memmap(shard_path(self.folder, s.index, "key"), KEY_DTYPE, "r")
                      for s in self.shards]
        for shard, offsets in zip(self.shards, self._offsets, strict=True):
            if offsets[0] != 0 or offsets[-1] != shard.bytes:
                raise CorpusError(f"{shard_path(self.folder, shard.index, 'idx')}: offsets "
                                  f"{offsets[0]}..{offsets[-1]} do not span the shard's "
                                  f"{shard.bytes} bytes (corrupt; prepare the corpus again)")

    def _check_files(self) -> None:
        """Every shard file has the manifest's size; the index and key files its hash."""
        if not self.shards:
            raise CorpusError(f"{self.folder}: the corpus holds no documents")
        for shard in self.shards:
            for kind, size in shard.sizes().items():
                path = shard_path(self.folder, shard.index, kind)
                try:
                    found = path.stat().st_size
                except FileNotFoundError:
                    raise CorpusError(f"{path}: missing (the manifest lists it); prepare the "
                                      f"corpus again") from None
                if found != size:
                    raise CorpusError(f"{path}: {found} bytes, the manifest says {size} "
                                      f"(truncated or corrupt; prepare the corpus again)")
                if kind != "bin" and file_digest(path) != shard.sha256.get(kind):
                    raise CorpusError(f"{path}: its SHA-256 does not match the manifest "
                                      f"(corrupt; prepare the corpus again)")
            if shard.documents < 1 or shard.bytes < 1:
                raise CorpusError(f"{self.folder / MANIFEST}: shard {shard.index} is empty")

    def verify(self) -> None:
        """Hash every document byte against the manifest (a full pass over the corpus)."""
        for shard in self.shards:
            path = shard_path(self.folder, shard.index, "bin")
            if file_digest(path) != shard.sha256.get("bin"):
                raise CorpusError(f"{path}: its SHA-256 does not match the manifest "
                                  f"(corrupt; prepare the corpus again)")

    def __len__(self) -> int:
        return self.num_documents

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} of {self.num_documents}")
        shard = int(np.searchsorted(self.first_document, index, side="right")) - 1
        return shard, index - int(self.first_document[shard])

    def document(self, index: int) -> np.ndarray:
        """Document `index`'s bytes, `[size]` uint8, a view into the mapped shard."""
        shard, local = self._locate(index)
        offsets = self._offsets[shard]
        return self._bins[shard][int(offsets[local]):int(offsets[local + 1])]

    def will_need(self, index: int, start: int, stop: int) -> None:
        """Ask the kernel to start reading bytes `start..stop-1` of document `index` now,
        without waiting (the trainer announces the next step's rows while it computes)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        shard, local = self._locate(index)
        first = int(self._offsets[shard][local]) + start
        aligned = first - first % mmap.PAGESIZE
        length = min(int(self._offsets[shard][local]) + stop, self.shards[shard].bytes) - aligned
        if length > 0:
            self._maps[shard].madvise(mmap.MADV_WILLNEED, aligned, length)

    def sizes(self, start: int, stop: int) -> np.ndarray:
        """Sizes of documents `start..stop-1`, `[stop - start]` int64."""
        return self._gather(start, stop, lambda s, a, b: np.diff(self._offsets[s][a:b + 1]))

    def keys(self, start: int, stop: int) -> np.ndarray:
        """Split keys of documents `start..stop-1`, `[stop - start]` uint64."""
        return self._gather(start, stop, lambda s, a, b: np.asarray(self._keys[s][a:b]))

    def _gather(self, start: int, stop: int, part) -> np.ndarray:
        pieces = []
        first = self.first_document
        shard = max(0, int(np.searchsorted(first, start, side="right")) - 1)
        while start < stop:
            end = min(stop, int(first[shard + 1]))
            pieces.append(part(shard, start - int(first[shard]), end - int(first[shard])))
            start, shard = end, shard + 1
        return np.concatenate(pieces) if pieces else np.empty(0, np.int64)

    def fingerprint(self) -> str:
        """Names this corpus's content (its shard hashes), for resume checks."""
        digest = hashlib.blake2b(digest_size=16)
        for shard in self.shards:
            for kind in SHARD_FILES:
                digest.update(shard.sha256.get(kind, "").encode())
        return digest.hexdigest()
