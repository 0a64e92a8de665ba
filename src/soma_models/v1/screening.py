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
(torch or Flax). The output file, its resuming and its shares per process are
`soma_models.v1.screen_output`; the `soma-models screen` command is a thin layer over its
`screen_to_jsonl`. The bf16 prescreen's margins and decision are `soma_models.v1.prescreen`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from soma_models.v1.backend import PieceTerms, ScoringBackend
from soma_models.v1.configs import V1_MAX_SUBMISSION_BYTES, ModelConfig, SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.inputs import finite_or_none, load_targets, map_file
from soma_models.v1.noise import check_seed
from soma_models.v1.prescreen import (
    CALIBRATION_SAMPLES,
    PRESCREENS,
    Approximate,
    Margins,
    calibrate,
    can_drop,
    check_margin,
)
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

# The prescreen's approximate pass runs over this many passes of rows at a time.
PRESCREEN_CHUNK_PASSES = 8

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
    `exact` is always True: these are the chain's numbers (the prescreen's other kind of
    result is `DroppedSample`).
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
    exact = True

    def to_json(self, embeddings: bool = False) -> dict[str, Any]:
        """The JSON line's fields (NaN written as null); the embedding only when asked."""
        out: dict[str, Any] = {
            "sample": self.sample, "bytes": self.bytes, "exact": True,
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


@dataclass(frozen=True)
class DroppedSample:
    """A sample the prescreen proved a miss (`soma_models.v1.prescreen.can_drop`): not
    scored exactly. nearest, distance: the approximate winner's nearest target and its
    approximate distance (None when none is finite)."""

    sample: str
    bytes: int
    nearest: int | None
    distance: float | None
    exact = False
    hit = False

    def to_json(self, embeddings: bool = False) -> dict[str, Any]:
        """The JSON line's fields: `"exact": false` and the approximate distance."""
        return {"sample": self.sample, "bytes": self.bytes, "exact": False,
                "nearest": self.nearest, "distance": finite_or_none(self.distance),
                "hit": False}


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
    prescreen: "bf16" runs an approximate first pass and re-scores exactly only the samples
        it cannot prove misses (`soma_models.v1.prescreen`; needs `threshold`; torch
        only). calibration_samples: how many first samples set the margins (scored both
        ways); margin_loss, margin_distance: margins given by hand instead. The margins in
        use are `margins` once the first samples are screened.
    """

    def __init__(self, weights_list: Sequence[object], targets: object, seed: int = 0, *,
                 keys: Sequence[object | None] | None = None,
                 protocol: str | Revision | None = None, model_config: ModelConfig | None = None,
                 sig_reg_config: SIGRegConfig | None = None, max_seq_len: int | None = None,
                 batch_size: int | None = None, framework: str = "torch",
                 device: object = None, micro_batch_size: int | str | None = None,
                 threshold: float | None = None,
                 max_sample_bytes: int | None = V1_MAX_SUBMISSION_BYTES,
                 contract: ScoringContract | None = None, prescreen: str | None = None,
                 calibration_samples: int = CALIBRATION_SAMPLES,
                 margin_loss: float | None = None, margin_distance: float | None = None):
        weights_list, keys = pair_keys(weights_list, keys, "screening", "models")
        check_prescreen(prescreen, threshold, framework)
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be at least 1, got "
                             f"{calibration_samples}")
        self.prescreen = prescreen
        self.calibration_samples = calibration_samples
        self.margin_loss = check_margin("margin_loss", margin_loss)
        self.margin_distance = check_margin("margin_distance", margin_distance)
        self.margins: Margins | None = None
        if margin_loss is not None and margin_distance is not None:
            self.margins = Margins(margin_loss, margin_distance)
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

    def screen(self, samples: Iterable[tuple[str, object]]
               ) -> Iterator[SampleResult | DroppedSample]:
        """Results for `(name, bytes-like data)` samples, in the order given: exact
        `SampleResult`s, and with `prescreen` `DroppedSample`s for proven misses.

        Samples are read lazily; at most one pass of rows (and the samples those rows
        belong to) is held at a time, with `prescreen` one chunk of passes.
        """
        if self.prescreen is None:
            for sample in self._scored(samples):
                yield self._result(sample)
        else:
            yield from self._prescreened(iter(samples))

    def _prescreened(self, samples: Iterator[tuple[str, object]]
                     ) -> Iterator[SampleResult | DroppedSample]:
        if self.margins is None:
            head = list(itertools.islice(samples, self.calibration_samples))
            exact = list(self._scored(head))
            approximate = [self._approximate(s) for s in self._scored(head, self.prescreen)]
            self.margins = calibrate(approximate, [self._approximate(s) for s in exact],
                                     margin_loss=self.margin_loss,
                                     margin_distance=self.margin_distance)
            for sample in exact:
                yield self._result(sample)
        while chunk := self._chunk(samples):
            approximate = [self._approximate(s) for s in self._scored(chunk, self.prescreen)]
            drop = [can_drop(a, self.threshold, self.margins)  # type: ignore[arg-type]
                    for a in approximate]
            exact = self._scored([s for s, d in zip(chunk, drop) if not d])
            for (name, data), approx, dropped in zip(chunk, approximate, drop):
                if dropped:
                    yield DroppedSample(name, memoryview(data).nbytes,  # type: ignore[arg-type]
                                        *approx.nearest())
                else:
                    yield self._result(next(exact))

    def _chunk(self, samples: Iterator[tuple[str, object]]) -> list[tuple[str, object]]:
        """The next samples, up to PRESCREEN_CHUNK_PASSES passes of rows: the approximate
        pass runs over them, then the exact pass over those it keeps (a partly filled last
        pass per chunk is the cost of keeping the output in input order)."""
        chunk, rows = [], 0
        for name, data in samples:
            chunk.append((name, data))
            rows += -(-memoryview(data).nbytes // self.max_seq_len)  # type: ignore[arg-type]
            if rows >= PRESCREEN_CHUNK_PASSES * self.rows_per_pass:
                break
        return chunk

    def _approximate(self, sample: _Open) -> Approximate:
        """Every model's loss and distances to every target (the prescreen's view)."""
        return Approximate(
            np.array([float(m.loss) for m in sample.means]),
            np.array([[cosine_distance(m.embedding, t) for t in self.targets]
                      for m in sample.means]))

    def _scored(self, samples: Iterable[tuple[str, object]], precision: str = "float32"
                ) -> Iterator[_Open]:
        """Every sample with its per-model running means complete, in the order given."""
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
            self._run_pass(pass_rows, precision)
            while waiting and waiting[0].done:
                yield waiting.pop(0)
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

    def _run_pass(self, rows: list[tuple[_Open, int, np.ndarray, np.ndarray, np.ndarray]],
                  precision: str = "float32") -> None:
        token_ids = np.stack([r[2] for r in rows])
        targets = np.stack([r[3] for r in rows])
        pos_ids = np.stack([r[4] for r in rows])
        batch_index = np.array([r[1] for r in rows])
        slots, noise_index = np.unique(batch_index, return_inverse=True)
        noises = [self.noise.get(int(k), self.embedding_dim, self.sig_reg_config.slices)
                  for k in slots]
        for m, backend in enumerate(self.backends):
            terms = (backend.row_terms(token_ids, targets, pos_ids, noises, noise_index)
                     if precision == "float32" else
                     backend.row_terms(token_ids, targets, pos_ids, noises, noise_index,
                                       precision=precision))
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


def check_prescreen(prescreen: str | None, threshold: float | None,
                    framework: str = "torch") -> None:
    """Refuse a prescreen that cannot run, in one line, before any model is loaded."""
    if prescreen is None:
        return
    if prescreen not in PRESCREENS:
        raise ValueError(f"prescreen must be one of {', '.join(PRESCREENS)}, got {prescreen!r}")
    if threshold is None:
        raise ValueError(f"prescreen {prescreen!r} needs a threshold: it only proves samples "
                         "to be misses, and a miss is a distance at or over the threshold")
    if framework != "torch":
        raise ValueError(f"prescreen {prescreen!r} runs with the torch framework; the "
                         f"{framework} backend scores in float32 only")


def _file_identity(weights: object) -> list[object] | None:
    """[real path, size, mtime in ns] of a weights file; None for weights given in memory."""
    if not isinstance(weights, (str, os.PathLike)):
        return None
    stat = os.stat(weights)
    return [os.path.realpath(weights), stat.st_size, stat.st_mtime_ns]


def screen(weights_list: Sequence[object], samples: Iterable[tuple[str, object]],
           targets: object, seed: int = 0, **kwargs: Any
           ) -> list[SampleResult | DroppedSample]:
    """Screen `(name, data)` samples: `Screener(weights_list, targets, seed, **kwargs)`."""
    return list(Screener(weights_list, targets, seed, **kwargs).screen(samples))


__all__ = ["DroppedSample", "SampleResult", "Screener", "check_prescreen", "check_sample_size",
           "find_samples", "load_targets", "screen"]
