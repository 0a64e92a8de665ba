"""Screen many data samples against a target's models, as the chain scores each one (SPEC §7).

For every sample the chain runs a competition: each model scored on the sample alone with
seed 0, the lowest loss wins, and the winner's embedding is compared with the target.
`screen` gives, per sample, exactly what `soma_models.v1.scoring.compete` gives for that
sample by itself (losses to float32 summation order, hence the same winner and distances),
and faster for many samples (on a GPU, where small passes leave the device idle, most; on
a CPU the forward passes themselves dominate, and the gain is about 1.2x, see
benchmarks/README.md):

* every model is loaded once, and every batch index's SIGReg noise is drawn once (a
  sample's batch k always uses `seed + k`, so all single-batch samples share one noise);
* the rows of many samples go through one forward pass. Rows are independent through the
  model, and the cross-entropy, SIGReg and embedding terms are sums over positions, so a
  backend's `row_terms` keeps each row's sums apart and they are added up per sample and
  batch here; each sample then gets its own per-batch losses and running means, combined
  by the same `BatchResult` / `RunningMeans` as `score`.

Framework-free: the models are `ScoringBackend`s from `soma_models.v1.scoring.load_backend`
(torch or Flax). The `soma-models screen` command is a thin layer over `screen_to_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import numpy as np

from soma_models.v1.backend import PieceTerms, ScoringBackend
from soma_models.v1.configs import V1_MAX_SUBMISSION_BYTES, ModelConfig, SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.inputs import finite_or_none, load_targets, map_file
from soma_models.v1.noise import check_seed
from soma_models.v1.revisions import Revision
from soma_models.v1.scoring import (
    BatchResult,
    NaNLossWarning,
    NoiseSource,
    RunningMeans,
    cosine_distance,
    load_backend,
    nan_loss_message,
    pair_keys,
    pick_winner,
    resolve_micro_batch_size,
)
from soma_models.v1.tokenizer import iter_batches, num_batches

# --------------------------------------------------------------------------- inputs

def check_sample_size(name: str, n_bytes: int, max_bytes: int | None) -> None:
    """Refuse what the chain would: an empty sample (the runtime scores no empty data) and,
    unless `max_bytes` is None, one over the network's limit on submitted data."""
    if n_bytes == 0:
        raise ValueError(f"{name}: sample is empty: the runtime refuses empty data "
                         "('data loader produced no batches')")
    if max_bytes is not None and n_bytes > max_bytes:
        raise ValueError(f"{name}: {n_bytes:,} bytes, over the network's limit of "
                         f"{max_bytes:,} bytes for submitted data: it cannot be submitted")


def find_samples(paths: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = (),
                 max_bytes: int | None = V1_MAX_SUBMISSION_BYTES) -> list[str]:
    """Every sample file under `paths` (files as given, folders walked recursively, in
    sorted order), without duplicates and without `exclude` (e.g. the output file).

    Raises FileNotFoundError for a missing path, and ValueError when no sample is found or
    a file cannot be a submission (`check_sample_size`), before any work.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real in excluded or real in seen:
            return
        seen.add(real)
        check_sample_size(path, os.path.getsize(path), max_bytes)
        found.append(path)

    for given in paths:
        path = os.fspath(given)
        if os.path.isfile(path):
            add(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if os.path.isfile(os.path.join(root, name)):
                        add(os.path.join(root, name))
        else:
            raise FileNotFoundError(f"{path}: no such data file or folder")
    if not found:
        raise ValueError(f"no sample files found in {', '.join(map(os.fspath, paths))}")
    return found


def read_sample(path: str) -> memoryview:
    """The sample's bytes, memory-mapped read-only (large samples are not copied)."""
    check_sample_size(path, os.path.getsize(path), None)  # mmap needs a byte
    return map_file(path)


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SampleResult:
    """One sample's competition and its distances to every target.

    losses: `[models]`; winner: index into them (the runtime's argmin, `pick_winner`);
    embedding: the winner's `[D]` float32 embedding; distances: `[targets]` cosine
    distances of that embedding (NaN for a zero vector); nearest: index of the smallest
    distance (None when all are NaN); hit: distance < threshold (None without a threshold).
    """

    sample: str
    bytes: int
    losses: list[float]
    winner: int
    loss: float
    embedding: np.ndarray
    distances: list[float]
    nearest: int | None
    distance: float | None
    hit: bool | None

    def to_json(self, embeddings: bool = False) -> dict[str, Any]:
        """The JSON line's fields (NaN written as null); the embedding only when asked."""
        out: dict[str, Any] = {
            "sample": self.sample, "bytes": self.bytes,
            "losses": [finite_or_none(x) for x in self.losses],
            "winner": self.winner, "loss": finite_or_none(self.loss)}
        if embeddings:
            out["embedding"] = [finite_or_none(float(v)) for v in self.embedding]
        out["distances"] = [finite_or_none(d) for d in self.distances]
        out["nearest"] = self.nearest
        out["distance"] = finite_or_none(self.distance)
        if self.hit is not None:
            out["hit"] = self.hit
        return out


def _nearest(distances: Sequence[float]) -> int | None:
    finite = [(d, i) for i, d in enumerate(distances) if not math.isnan(d)]
    return min(finite)[1] if finite else None


# --------------------------------------------------------------------------- driver

class _Open:
    """A sample being screened: its per-model running means and its unfinished batches."""

    def __init__(self, name: str, n_bytes: int, n_batches: int, n_models: int, dim: int):
        self.name = name
        self.bytes = n_bytes
        self.n_batches = n_batches
        self.means = [RunningMeans(dim) for _ in range(n_models)]
        self.folded = 0                                   # batches folded into the means
        # batch index -> [ce sums [models], SIGReg sums [models], embedding sums [models, D],
        #                 rows still to come, batch shape]
        self.batches: dict[int, list[Any]] = {}

    @property
    def done(self) -> bool:
        return self.folded == self.n_batches


class Screener:
    """The models of one target, loaded once, ready to screen any number of samples.

    weights_list: paths, bytes, canonical arrays or loaded models (as for `compete`).
    targets: `[n, D]` (or `[D]`) target embeddings.
    keys: one decryption key (or None) per weights.
    protocol, contract: the revision whose contract and SIGReg to use, by name or as a
        `ScoringContract` (neither: the process-wide revision's); `max_seq_len`,
        `batch_size`, `sig_reg_config` override its parts (experiments, tests).
    micro_batch_size: rows per forward pass (None: the revision's batch size; "auto":
        about 2 GiB of activations per pass on an accelerator, 2-4 cache-sized rows on a
        CPU). Memory and speed only: results do not depend on it beyond float32
        summation order.
    threshold: a sample is a hit when its nearest distance is below this.
    max_sample_bytes: samples over this many bytes are refused (default: the network's
        limit on submitted data, 1 MiB); None screens any length.
    device, framework: as for `compete`; scoring always runs in float32 with TF32 off.
    """

    def __init__(self, weights_list: Sequence[object], targets: object, seed: int = 0, *,
                 keys: Sequence[object | None] | None = None,
                 protocol: str | Revision | None = None, model_config: ModelConfig | None = None,
                 sig_reg_config: SIGRegConfig | None = None, max_seq_len: int | None = None,
                 batch_size: int | None = None, framework: str = "torch",
                 device: object = None, micro_batch_size: int | str | None = None,
                 threshold: float | None = None,
                 max_sample_bytes: int | None = V1_MAX_SUBMISSION_BYTES,
                 contract: ScoringContract | None = None):
        weights_list, keys = pair_keys(weights_list, keys, "screening", "models")
        self.contract = ScoringContract.resolve(
            contract, protocol, max_seq_len=max_seq_len, batch_size=batch_size,
            sig_reg_config=sig_reg_config)
        self.revision = self.contract.revision
        self.seed = check_seed(seed)
        self.max_seq_len = self.contract.max_seq_len
        self.batch_size = self.contract.batch_size
        self.sig_reg_config = self.contract.sig_reg
        targets = np.asarray(targets, dtype=np.float32)
        self.targets = targets[None, :] if targets.ndim == 1 else targets
        if self.targets.ndim != 2 or self.targets.shape[0] == 0:
            raise ValueError(f"targets must be [n, embedding_dim] with n >= 1, got shape "
                             f"{list(self.targets.shape)}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        self.threshold = threshold
        self.max_sample_bytes = max_sample_bytes
        self.backends: list[ScoringBackend] = []
        # What names each model in `run_id`, taken as it is loaded: a file by its real path,
        # size and modification time; weights given in memory by position only.
        self.model_files = [_file_identity(w) for w in weights_list]
        self.names = [os.fspath(w) if isinstance(w, (str, os.PathLike)) else f"#{i}"
                      for i, w in enumerate(weights_list)]
        for weights, key in zip(weights_list, keys):
            backend = load_backend(weights, model_config=model_config, framework=framework,
                                   device=device, key=key, contract=self.contract)
            backend.config.require_contract_vocab()
            self.backends.append(backend)
            self._check_dims(weights, backend.config.embedding_dim)
        self.embedding_dim = self.backends[0].config.embedding_dim
        # The pass holds this many rows; the largest model sets the memory bound.
        widest = max((b.config for b in self.backends),
                     key=lambda c: c.pwff_hidden_dim + 6 * c.embedding_dim + c.vocab_size)
        self.rows_per_pass = resolve_micro_batch_size(
            micro_batch_size, widest, self.max_seq_len, self.batch_size,
            on_cpu=self.backends[0].on_cpu)
        self.noise = NoiseSource(self.seed)

    def _check_dims(self, weights: object, dim: int) -> None:
        label = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else \
            f"model #{len(self.backends)}"
        if self.backends and dim != self.backends[0].config.embedding_dim:
            raise ValueError(f"{label}: embedding_dim {dim} differs from the first model's "
                             f"{self.backends[0].config.embedding_dim}; a target's models "
                             "must share one")
        if self.targets.shape[1] != dim:
            raise ValueError(f"targets have {self.targets.shape[1]} values each, the models' "
                             f"embeddings have {dim} ({label})")

    def run_id(self) -> str:
        """16 hex digits naming what decides the results: the models (`model_files`), the
        targets, the seed and the contract (revision, rows, batches, SIGReg). Written on
        every JSONL line, so that resuming never mixes two different screenings."""
        identity = json.dumps({
            "models": self.model_files, "seed": self.seed, "protocol": self.revision.name,
            "max_seq_len": self.max_seq_len, "batch_size": self.batch_size,
            "sig_reg": [self.sig_reg_config.t_max, self.sig_reg_config.points,
                        self.sig_reg_config.slices, self.sig_reg_config.coefficient],
            "targets": hashlib.blake2b(np.ascontiguousarray(self.targets).tobytes(),
                                       digest_size=16).hexdigest(),
            "target_shape": list(self.targets.shape)}, sort_keys=True)
        return hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()

    # ------------------------------------------------------------------ the passes

    def screen(self, samples: Iterable[tuple[str, object]]) -> Iterator[SampleResult]:
        """Results for `(name, bytes-like data)` samples, in the order given.

        Samples are read lazily; at most one pass of rows (and the samples those rows
        belong to) is held at a time.
        """
        rows = self._rows(samples)
        waiting: list[_Open] = []
        while True:
            pass_rows = []
            for row in rows:
                pass_rows.append(row)
                if row[0] not in waiting[-1:]:
                    waiting.append(row[0])
                if len(pass_rows) == self.rows_per_pass:
                    break
            if not pass_rows:
                break
            self._run_pass(pass_rows)
            while waiting and waiting[0].done:
                yield self._result(waiting.pop(0))
        assert not waiting

    def _rows(self, samples: Iterable[tuple[str, object]]
              ) -> Iterator[tuple[_Open, int, np.ndarray, np.ndarray, np.ndarray]]:
        """(sample, batch index, token_ids, targets, pos_ids) for every row, in order."""
        n_models = len(self.backends)
        for name, data in samples:
            n_bytes = memoryview(data).nbytes  # type: ignore[arg-type]
            check_sample_size(name, n_bytes, self.max_sample_bytes)
            sample = _Open(name, n_bytes, num_batches(n_bytes, self.max_seq_len, self.batch_size),
                           n_models, self.embedding_dim)
            batches = iter_batches(data, self.max_seq_len, self.batch_size)  # type: ignore[arg-type]
            for k, batch in enumerate(batches):
                shape = batch.token_ids.shape
                sample.batches[k] = [np.zeros(n_models), np.zeros(n_models),
                                     np.zeros((n_models, self.embedding_dim)), shape[0], shape]
                for r in range(shape[0]):
                    yield sample, k, batch.token_ids[r], batch.targets[r], batch.pos_ids[r]

    def _run_pass(self, rows: list[tuple[_Open, int, np.ndarray, np.ndarray, np.ndarray]]
                  ) -> None:
        token_ids = np.stack([r[2] for r in rows])
        targets = np.stack([r[3] for r in rows])
        pos_ids = np.stack([r[4] for r in rows])
        batch_index = np.array([r[1] for r in rows])
        slots, noise_index = np.unique(batch_index, return_inverse=True)
        noises = [self.noise.get(int(k), self.embedding_dim, self.sig_reg_config.slices)
                  for k in slots]
        for m, backend in enumerate(self.backends):
            terms = backend.row_terms(token_ids, targets, pos_ids, noises, noise_index)
            for i, (sample, k, *_) in enumerate(rows):
                open_batch = sample.batches[k]
                open_batch[0][m] += terms.ce_sums[i]
                open_batch[1][m] += terms.sig_reg_sums[i]
                open_batch[2][m] += terms.embedding_means[i]
        coefficient = np.float32(self.sig_reg_config.coefficient)
        for sample, k, *_ in rows:
            open_batch = sample.batches[k]
            open_batch[3] -= 1
            # Batches finish in order (rows are scheduled in order), so fold as they do.
            while sample.folded in sample.batches and sample.batches[sample.folded][3] == 0:
                ce, sig, emb, _, shape = sample.batches.pop(sample.folded)
                for m, means in enumerate(sample.means):
                    terms = PieceTerms(float(ce[m]), np.array([sig[m]]), emb[m])
                    means.add(BatchResult.of(terms, shape, coefficient))
                sample.folded += 1

    def _result(self, sample: _Open) -> SampleResult:
        losses = [float(means.loss) for means in sample.means]
        winner = pick_winner(losses)
        message = nan_loss_message(losses, self.names)
        if message is not None:
            # The same message for every such sample: Python's warning filter shows it once.
            warnings.warn(message, NaNLossWarning, stacklevel=2)
        embedding = sample.means[winner].embedding
        distances = [cosine_distance(embedding, target) for target in self.targets]
        nearest = _nearest(distances)
        distance = None if nearest is None else distances[nearest]
        hit = None
        if self.threshold is not None:
            hit = distance is not None and distance < self.threshold
        return SampleResult(sample.name, sample.bytes, losses, winner, losses[winner],
                            embedding, distances, nearest, distance, hit)


def _file_identity(weights: object) -> list[object] | None:
    """[real path, size, mtime in ns] of a weights file; None for weights given in memory."""
    if not isinstance(weights, (str, os.PathLike)):
        return None
    stat = os.stat(weights)
    return [os.path.realpath(weights), stat.st_size, stat.st_mtime_ns]


def screen(weights_list: Sequence[object], samples: Iterable[tuple[str, object]],
           targets: object, seed: int = 0, **kwargs: Any) -> list[SampleResult]:
    """Screen `(name, data)` samples: `Screener(weights_list, targets, seed, **kwargs)`."""
    return list(Screener(weights_list, targets, seed, **kwargs).screen(samples))


# --------------------------------------------------------------------------- JSONL output

def finished_samples(out: str | os.PathLike, run: str | None = None) -> set[str]:
    """Samples already written to `out` (for resuming). A trailing partial line, left by
    an interrupted write, is cut off so that appending starts on a fresh line. With `run`
    (`Screener.run_id`), a line written by another screening is refused, before anything
    is cut."""
    path = Path(out)
    if not path.exists():
        return set()
    if not path.is_file():
        raise ValueError(f"{path}: --out is not a regular file")
    done: set[str] = set()
    with open(path, "rb+") as fh:
        content = fh.read()
        end = content.rfind(b"\n") + 1
        for number, line in enumerate(content[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                done.add(record["sample"])
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
                raise ValueError(f"{path}:{number}: not a screening result line; refusing "
                                 "to append to it (use another --out)") from None
            if run is not None and record.get("run") != run:
                raise ValueError(f"{path}:{number}: written by another screening (other "
                                 "models, targets, seed or revision); refusing to mix "
                                 "results (use another --out)")
        if end < len(content):
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return done


class LineWriter:
    """Appends whole lines durably: each line goes out in one write and is fsynced, so an
    interruption loses at most the line being written, and `finished_samples` cuts that."""

    def __init__(self, out: str | os.PathLike | None):
        self.path = None if out is None else Path(out)
        self._fd = None if self.path is None else os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        if self._fd is None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Summary:
    screened: int
    skipped: int
    hits: int | None
    seconds: float

    def __str__(self) -> str:
        rate = self.screened / self.seconds if self.seconds > 0 else float("inf")
        hits = "no --threshold" if self.hits is None else f"{self.hits} hits"
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        return f"screened {self.screened} samples{skipped}, {hits}, {rate:.3g} samples/s"


def screen_to_jsonl(screener: Screener, sample_paths: Sequence[str],
                    out: str | os.PathLike | None = None, *, embeddings: bool = False,
                    progress: bool = False, stream: IO[str] | None = None) -> Summary:
    """Screen sample files, one JSON line each to `out` (or stdout) with the screening's
    `run` id, skipping the samples `out` already holds (and refusing an `out` written by
    another screening); returns the run's summary."""
    run = screener.run_id()
    done = finished_samples(out, run) if out is not None else set()
    todo = [p for p in sample_paths if p not in done]
    hits = 0
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with LineWriter(out) as writer, tqdm(total=len(todo), disable=not progress,
                                         file=stream or sys.stderr, unit="sample",
                                         desc="screening", dynamic_ncols=True) as bar:
        for result in screener.screen((p, read_sample(p)) for p in todo):
            writer.write(json.dumps({**result.to_json(embeddings), "run": run},
                                    allow_nan=False))
            hits += bool(result.hit)
            bar.update(1)
    return Summary(len(todo), len(sample_paths) - len(todo),
                   None if screener.threshold is None else hits,
                   time.perf_counter() - start)


__all__ = ["SampleResult", "Screener", "Summary", "check_sample_size", "find_samples",
           "finished_samples", "load_targets", "screen", "screen_to_jsonl"]
