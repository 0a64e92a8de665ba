"""Documents, whatever holds them: a prepared corpus, a folder of raw files, a list in memory.

All three answer the same questions, which is all the trainer's data layer asks:

* `len(docs)`: how many documents;
* `docs.document(i)`: document i's bytes, `[size]` uint8 (a memory-mapped view for the
  corpus and for raw files: nothing is read until a row needs it);
* `docs.sizes(a, b)` / `docs.keys(a, b)`: sizes (int64) and split keys (uint64) of
  documents a..b-1, asked for in blocks so that nothing per document need stay in memory;
* `docs.name`: what they are, for messages; `docs.fingerprint()`: their identity.

`open_documents(paths)` picks: a prepared corpus folder (`soma_models.corpus.layout`) given
alone, else files of raw bytes (one document per file, empty ones dropped). A raw folder's
file list is held in memory (a name and a size per file); for millions of files, prepare a
corpus.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from soma_models.corpus.inputs import find_sources, name_key
from soma_models.corpus.layout import Corpus, CorpusError, is_corpus

_OPEN_FILES = 256  # raw files kept mapped at once (each map holds a file descriptor)


class Documents(Protocol):
    name: str

    def __len__(self) -> int: ...
    def document(self, index: int) -> np.ndarray: ...
    def sizes(self, start: int, stop: int) -> np.ndarray: ...
    def keys(self, start: int, stop: int) -> np.ndarray: ...
    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class Document:
    """One document in memory. `name` is its path relative to the input root."""

    name: str
    data: bytes


class InMemoryDocuments:
    """A list of `Document`s (tests, small data); keys from the names, as for raw files."""

    def __init__(self, documents: Sequence[Document], name: str = "documents"):
        self.documents = [d for d in documents if len(d.data)]
        self.names = [d.name for d in self.documents]
        self.name = name
        self._sizes = np.array([len(d.data) for d in self.documents], np.int64)
        self._keys = np.array([name_key(d.name) for d in self.documents], np.uint64)

    def __len__(self) -> int:
        return len(self.documents)

    def document(self, index: int) -> np.ndarray:
        return np.frombuffer(self.documents[index].data, np.uint8)

    def sizes(self, start: int, stop: int) -> np.ndarray:
        return self._sizes[start:stop]

    def keys(self, start: int, stop: int) -> np.ndarray:
        return self._keys[start:stop]

    def fingerprint(self) -> str:
        return _names_and_sizes([d.name for d in self.documents], self._sizes)


class RawFiles:
    """Files of raw bytes, one document each, memory-mapped when first used (at most
    `_OPEN_FILES` stay mapped, least recently used first out)."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        # Sorted by name (a name given twice is one file): the order does not depend on
        # the order of the arguments.
        by_name = {s.name: s for s in find_sources(list(paths), classify=False)}
        sources = [by_name[name] for name in sorted(by_name)]
        where = ", ".join(str(p) for p in paths)
        if not sources:
            raise CorpusError(f"{where}: no files found")
        kept = [s for s in sources if s.size > 0]
        if not kept:
            raise CorpusError(f"{where}: no data (found {len(sources)} file(s), all empty)")
        self.name = where
        self.names = [s.name for s in kept]
        self.paths = [s.path for s in kept]
        self._sizes = np.array([s.size for s in kept], np.int64)
        self._keys = np.array([name_key(s.name) for s in kept], np.uint64)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def document(self, index: int) -> np.ndarray:
        found = self._maps.get(index)
        if found is None:
            path = self.paths[index]
            try:
                found = np.memmap(path, np.uint8, "r")
            except (OSError, ValueError) as exc:
                raise CorpusError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})"
                                  ) from None
            if len(found) != self._sizes[index]:
                raise CorpusError(f"{path}: changed size while in use ({self._sizes[index]} -> "
                                  f"{len(found)} bytes)")
            self._maps[index] = found
            if len(self._maps) > _OPEN_FILES:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(index)
        return found

    def sizes(self, start: int, stop: int) -> np.ndarray:
        return self._sizes[start:stop]

    def keys(self, start: int, stop: int) -> np.ndarray:
        return self._keys[start:stop]

    def fingerprint(self) -> str:
        return _names_and_sizes(self.names, self._sizes)


class CorpusDocuments(Corpus):
    """A prepared corpus as `Documents`."""

    @property
    def name(self) -> str:
        return str(self.folder)


def _names_and_sizes(names: Sequence[str], sizes: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, size in zip(names, sizes.tolist(), strict=True):
        digest.update(name.encode("utf-8") + b"\0" + int(size).to_bytes(8, "little"))
    return digest.hexdigest()


def open_documents(paths: Sequence[str | os.PathLike]) -> Documents:
    """A corpus folder given alone, else raw files (see the module docstring)."""
    if not paths:
        raise CorpusError("no data paths given")
    corpora = [p for p in paths if is_corpus(p)]
    if corpora:
        if len(paths) > 1:
            raise CorpusError(f"{corpora[0]}: a prepared corpus must be the only data path "
                              f"(prepare the others into it: soma-models prepare SRC... -o "
                              f"CORPUS)")
        return CorpusDocuments(Path(corpora[0]))
    return RawFiles(paths)
