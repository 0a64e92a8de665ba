"""Score weights exactly as the chain does (SPEC §6-§8), framework-free.

The driver here walks the data contract's batches, draws each batch's SIGReg noise,
asks a framework backend (`soma_models.v1.torch.evaluate`, `soma_models.v1.flax.evaluate`)
for the batch's raw terms, and combines them the runtime's way:

    ce_k   = sum over non-PAD targets of -log p(target) / (B_k * S)   # PAD targets count in S
    loss_k = ce_k + coefficient * SIGReg(reps_k, noise(seed + k))
    emb_k  = mean over rows of (mean over positions of reps_k)
    m_k    = m_{k-1} + (x_k - m_{k-1}) / k                            # each batch weighs the same

A backend only computes `PieceTerms` (`soma_models.v1.backend`) for some rows of a batch
(`micro_batch_size` splits batches into pieces to bound memory; the terms are sums, so the
pieces add up to the whole batch's). Everything else -- the contract, the noise, the
per-batch combination (`BatchResult`) and running means (`RunningMeans`), the batch-order
range, competitions -- lives here once; `soma_models.v1.screening` reuses them.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from soma_models.errors import WeightsFormatError
from soma_models.safetensors_io import SafetensorsFile, describe_source
from soma_models.v1.backend import PieceTerms, ScoringBackend
from soma_models.v1.batch_order import (
    BatchOrderRange,
    extreme_sums,
    feasible_slots,
    order_count,
)
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.noise import check_seed, scoring_noise
from soma_models.v1.revisions import Revision
from soma_models.v1.schema import recorded_protocol
from soma_models.v1.sources import check_weights, model_framework
from soma_models.v1.tokenizer import ArrayBatch, iter_batches, num_batches
from soma_models.v1.transit import (
    commitment,
    decrypt_source,
    decrypt_weights,
    encrypt_weights,
)
from soma_models.v1.validation import Report, validate

FRAMEWORKS = ("torch", "flax")
# Batch-order ranges need a SIGReg term for every feasible (batch, slot) pair, about
# 3n^2/4 of them; past this many batches we refuse rather than run for days.
MAX_RANGE_BATCHES = 1024
# Noise arrays kept for reuse (ranges and competitions revisit slots) up to this many bytes.
NOISE_CACHE_BYTES = 1 << 30
# "auto" micro-batches. On an accelerator, one piece's float32 activations stay near
# AUTO_PIECE_BYTES: few large passes keep the device busy. On a CPU, large passes only
# stream activations through main memory; pieces of ~32 MiB, clamped to 2-4 rows, were
# fastest from `tiny` to one full-width V1 layer (benchmarks/README.md, "Screening").
AUTO_PIECE_BYTES = 2 << 30
AUTO_PIECE_BYTES_CPU = 32 << 20
AUTO_ROWS_CPU = (2, 4)


@dataclass(frozen=True)
class Score:
    """The chain's score of one weights file on one data set and seed.

    loss: running mean of the per-batch losses (the sequential, reference order).
    embedding: `[D]` float32 running mean of the per-batch embeddings.
    batch_losses: `[n_batches]` float32 loss of each batch in the reference order.
    range: lowest/highest loss over the loader's possible batch orders (None unless asked).
    """

    loss: float
    embedding: np.ndarray
    batch_losses: np.ndarray
    range: BatchOrderRange | None = None
    #: The revision whose settings computed it ("0.1.1" or "0.1.7").
    protocol: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "loss": self.loss,
                               "embedding": self.embedding.tolist()}
        if self.range is not None:
            out["range"] = {"low": self.range.low, "high": self.range.high,
                            "exact": self.range.exact, "orders": self.range.orders}
        return out


@dataclass(frozen=True)
class Competition:
    """Several weights scored on the same data and seed (SPEC §7).

    winner: the runtime's argmin over the losses in input order (SPEC §7): the first one
        wins a tie; a NaN at index 0 wins (nothing compares below it), a NaN elsewhere
        is passed over.
    distance: cosine distance between the winner's embedding and the target (NaN when
        either vector is zero; None when no target was given).
    """

    winner: int
    loss: float
    embedding: np.ndarray
    distance: float | None
    losses: list[float]
    scores: list[Score] = field(repr=False)
    protocol: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "winner": self.winner, "loss": self.loss,
                "embedding": self.embedding.tolist(), "distance": self.distance,
                "losses": self.losses}


# --------------------------------------------------------------------------- noise

class NoiseSource:
    """`scoring_noise(seed, k, D, slices)` with a bounded cache: batch-order ranges revisit
    slots, and every model of a competition needs the same noise."""

    def __init__(self, seed: int, budget_bytes: int = NOISE_CACHE_BYTES):
        self.seed = check_seed(seed)
        self._budget = budget_bytes
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def get(self, k: int, embedding_dim: int, slices: int) -> np.ndarray:
        cache_key = (k, embedding_dim, slices)
        noise = self._cache.get(cache_key)
        if noise is None:
            noise = scoring_noise(self.seed, k, embedding_dim, slices)
            if (len(self._cache) + 1) * noise.nbytes <= self._budget:
                self._cache[cache_key] = noise
        return noise


# --------------------------------------------------------------------------- weights

class RevisionMismatchWarning(UserWarning):
    """A weights file records another revision than the one it is scored under."""


class NaNLossWarning(UserWarning):
    """A model's loss is NaN (the competition's argmin treats it specially, SPEC §7)."""


def _warn_on_recorded_revision(source: object, weights: object, revision: Revision) -> None:
    """One line when the file says it was written for another revision than `revision`."""
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return
    try:
        recorded = recorded_protocol(SafetensorsFile(source).metadata)  # type: ignore[arg-type]
    except (WeightsFormatError, OSError, ValueError):
        return  # the backend reports a damaged file properly
    if recorded is not None and recorded != revision.name:
        warnings.warn(f"{describe_source(weights)} was written for protocol revision "
                      f"{recorded}; scoring it under {revision.name}", RevisionMismatchWarning,
                      stacklevel=4)


def load_backend(weights: object, *, model_config: ModelConfig | None = None,
                 sig_reg_config: SIGRegConfig | None = None, framework: str = "torch",
                 device: object = None, key: object | None = None,
                 protocol: str | Revision | None = None,
                 contract: ScoringContract | None = None) -> ScoringBackend:
    """Open `weights` (path, bytes, canonical arrays or a loaded model) for scoring.

    contract, protocol, sig_reg_config: the revision scored under and its SIGReg settings
        (`ScoringContract.resolve`; all None: the process-wide revision's). A file
        recording another revision in its metadata gets a `RevisionMismatchWarning`.
    """
    check_weights(weights)
    contract = ScoringContract.resolve(contract, protocol, sig_reg_config=sig_reg_config)
    revision = contract.revision
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    loaded = model_framework(weights)
    if loaded is not None and key is not None:
        raise TypeError("a decryption key applies to encrypted weights, not to a loaded model")
    framework = loaded or framework
    if isinstance(weights, (str, os.PathLike)) and not os.path.exists(weights):
        # Before importing a framework: that takes seconds, a typo should not.
        raise FileNotFoundError(f"{os.fspath(weights)}: no such weights file")
    source = decrypt_source(weights, key)
    _warn_on_recorded_revision(source, weights, revision)
    try:
        if framework == "torch":
            from soma_models.v1.torch.evaluate import TorchBackend as backend_cls
        else:
            from soma_models.v1.flax.evaluate import FlaxBackend as backend_cls
    except ImportError as exc:
        raise ImportError(f"scoring with {framework} needs it installed "
                          f"(pip install 'soma-models[{framework}]'): {exc}") from exc
    try:
        return backend_cls.open(source, model_config=model_config,
                                sig_reg_config=contract.sig_reg, device=device)
    except WeightsFormatError as exc:
        if key is None:
            raise
        hinted = [f"{problem} (wrong decryption key?)" for problem in exc.problems]
        raise WeightsFormatError(describe_source(weights), hinted) from None


# --------------------------------------------------------------------------- driver

def _data_length(data: object) -> int:
    return memoryview(data).nbytes  # type: ignore[arg-type]


def auto_micro_batch_size(config: ModelConfig, max_seq_len: int,
                          budget_bytes: int | None = None, *, on_cpu: bool = False) -> int:
    """Rows per piece so that one piece's float32 activations stay near `budget_bytes`
    (default: AUTO_PIECE_BYTES, or AUTO_PIECE_BYTES_CPU clamped to AUTO_ROWS_CPU on a CPU).

    Per row we count the feed-forward hidden layer, a handful of `[S, D]` tensors and the
    logits: `S * 4 * (hidden + 6 D + vocab)` bytes.
    """
    per_row = max_seq_len * 4 * (config.pwff_hidden_dim + 6 * config.embedding_dim
                                 + config.vocab_size)
    if budget_bytes is not None:
        return max(1, budget_bytes // per_row)
    if on_cpu:
        low, high = AUTO_ROWS_CPU
        return min(high, max(low, AUTO_PIECE_BYTES_CPU // per_row))
    return max(1, AUTO_PIECE_BYTES // per_row)


def resolve_micro_batch_size(micro_batch_size: int | str | None, config: ModelConfig,
                             max_seq_len: int, default: int, *, on_cpu: bool = False) -> int:
    """Rows per forward pass: a positive int as given, "auto" (bounded memory, sized for
    the device), None: `default`."""
    if micro_batch_size == "auto":
        return auto_micro_batch_size(config, max_seq_len, on_cpu=on_cpu)
    if micro_batch_size is None:
        return default
    if isinstance(micro_batch_size, int) and not isinstance(micro_batch_size, bool) \
            and micro_batch_size >= 1:
        return micro_batch_size
    raise ValueError(f"micro_batch_size must be a positive int, 'auto' or None, "
                     f"got {micro_batch_size!r}")


@dataclass(frozen=True)
class BatchResult:
    """One batch's loss and embedding from its raw terms, in the runtime's float32 steps.

    cross_entropy: ce_sum / positions; sig_reg: `[n_noises]` statistic per noise;
    loss: cross_entropy + coefficient * sig_reg[slot]; embedding: `[D]` mean over rows.
    """

    cross_entropy: np.float32
    sig_reg: np.ndarray
    loss: np.float32
    embedding: np.ndarray

    @classmethod
    def of(cls, terms: PieceTerms, shape: tuple[int, int], coefficient: np.float32,
           slot: int = 0) -> BatchResult:
        """`shape`: the batch's `[rows, seq_len]`; `slot`: which noise is the batch's own."""
        rows, seq_len = shape
        positions = rows * seq_len
        sig_reg = (terms.sig_reg_sums / positions).astype(np.float32)
        cross_entropy = np.float32(terms.ce_sum / positions)
        loss = np.float32(cross_entropy + coefficient * sig_reg[slot])
        embedding = (terms.embedding_sum / rows).astype(np.float32)
        return cls(cross_entropy, sig_reg, loss, embedding)


class RunningMeans:
    """The runtime's running means over batches, in float32: m_k = m_{k-1} + (x_k - m_{k-1}) / k."""

    def __init__(self, embedding_dim: int):
        self.count = 0
        self.loss = np.float32(0.0)
        self.embedding = np.zeros(embedding_dim, dtype=np.float32)

    def add(self, batch: BatchResult) -> None:
        self.count += 1
        count = np.float32(self.count)
        self.loss = np.float32(self.loss + (batch.loss - self.loss) / count)
        self.embedding = (self.embedding + (batch.embedding - self.embedding) / count
                          ).astype(np.float32)


def _batch_terms(backend: ScoringBackend, batch: ArrayBatch, noises: Sequence[np.ndarray],
                 rows_per_piece: int) -> PieceTerms:
    """The whole batch's terms, computed `rows_per_piece` rows at a time and added up."""
    rows = batch.token_ids.shape[0]
    ce_sum, sig_sums, emb_sum = 0.0, np.zeros(len(noises)), 0.0
    for start in range(0, rows, rows_per_piece):
        part = slice(start, start + rows_per_piece)
        terms = backend.piece_terms(batch.token_ids[part], batch.targets[part],
                                    batch.pos_ids[part], noises)
        ce_sum += terms.ce_sum
        sig_sums = sig_sums + terms.sig_reg_sums
        emb_sum = emb_sum + terms.embedding_sum
    return PieceTerms(ce_sum, np.asarray(sig_sums, dtype=np.float64),
                      np.asarray(emb_sum, dtype=np.float64))


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="batch",
                desc=desc, leave=False, dynamic_ncols=True)


def score_backend(backend: ScoringBackend, data: object, seed: int, *,
                  sig_reg_config: SIGRegConfig | None = None,
                  max_seq_len: int | None = None, batch_size: int | None = None,
                  micro_batch_size: int | str | None = None, batch_order_range: bool = False,
                  progress: bool = False, noise: NoiseSource | None = None,
                  desc: str = "scoring", protocol: str | Revision | None = None,
                  contract: ScoringContract | None = None) -> Score:
    """Score an opened backend (see `score` for the arguments)."""
    seed = check_seed(seed)
    contract = ScoringContract.resolve(contract, protocol, max_seq_len=max_seq_len,
                                       batch_size=batch_size, sig_reg_config=sig_reg_config)
    max_seq_len, batch_size = contract.max_seq_len, contract.batch_size
    sig_reg_config = contract.sig_reg
    config = backend.config
    config.require_contract_vocab()
    batches: Iterator[ArrayBatch] = iter_batches(
        data, max_seq_len, batch_size)  # type: ignore[arg-type]
    n_batches = num_batches(_data_length(data), max_seq_len, batch_size)
    if batch_order_range and n_batches > MAX_RANGE_BATCHES:
        raise ValueError(f"batch-order range needs ~3n^2/4 SIGReg evaluations; refusing "
                         f"{n_batches} batches (limit {MAX_RANGE_BATCHES})")
    rows_per_piece = resolve_micro_batch_size(micro_batch_size, config, max_seq_len, batch_size,
                                              on_cpu=backend.on_cpu)
    if noise is None or noise.seed != seed:
        noise = NoiseSource(seed)
    slots = feasible_slots(n_batches) if batch_order_range else None
    coefficient = np.float32(sig_reg_config.coefficient)
    # cost[b, k]: coefficient * SIGReg of batch b under slot k's noise (range only).
    cost = np.full((n_batches, n_batches), np.nan) if batch_order_range else None
    ce = np.zeros(n_batches, dtype=np.float32)
    batch_losses = np.zeros(n_batches, dtype=np.float32)
    means = RunningMeans(config.embedding_dim)
    with _progress_bar(n_batches, progress, desc) as bar:
        for k, batch in enumerate(batches):
            window = slots[k] if slots is not None else range(k, k + 1)
            noises = [noise.get(s, config.embedding_dim, sig_reg_config.slices) for s in window]
            terms = _batch_terms(backend, batch, noises, rows_per_piece)
            result = BatchResult.of(terms, batch.token_ids.shape, coefficient,
                                    slot=k - window.start)
            ce[k] = result.cross_entropy
            batch_losses[k] = result.loss
            means.add(result)
            if cost is not None:
                cost[k, window.start:window.stop] = coefficient * result.sig_reg.astype(np.float64)
            bar.update(1)
    order_range = None
    if cost is not None:
        low, high, exact = extreme_sums(cost)
        fixed = float(ce.astype(np.float64).sum())
        order_range = BatchOrderRange(low=(fixed + low) / n_batches,
                                      high=(fixed + high) / n_batches, exact=exact,
                                      orders=order_count(n_batches), n_batches=n_batches)
    return Score(float(means.loss), means.embedding, batch_losses, order_range,
                 contract.protocol)


def score(weights: object, data: object, seed: int, *, model_config: ModelConfig | None = None,
          sig_reg_config: SIGRegConfig | None = None, max_seq_len: int | None = None,
          batch_size: int | None = None, framework: str = "torch", device: object = None,
          micro_batch_size: int | str | None = None, progress: bool = False,
          key: object | None = None, batch_order_range: bool = False,
          protocol: str | Revision | None = None,
          contract: ScoringContract | None = None) -> Score:
    """Score `weights` on `data` with `seed` exactly as the chain does (SPEC §6).

    protocol: the revision whose runtime is reproduced: "0.1.7" (alias "latest"; the
        network) or "0.1.1" (the product page). None: `SOMA_MODELS_PROTOCOL` as read at
        import, else "0.1.7". It gives `max_seq_len`, `batch_size` and `sig_reg_config`
        whenever those are None (give them only for experiments), and `Score.protocol`.
    contract: a `ScoringContract` (revision and settings in one value) instead of
        `protocol`; `max_seq_len`, `batch_size`, `sig_reg_config` still override its parts.

    weights: path, bytes, dict of canonical arrays, or a loaded torch/Flax `Model`
        (config inferred from the shapes when `model_config` is None; heads from the
        file's metadata, else V1's 8).
    data: bytes-like (bytes, bytearray, memoryview, mmap, uint8 array); empty -> ValueError.
    seed: u64.
    framework: "torch" or "flax" (ignored for a loaded model, which uses its own).
    micro_batch_size: rows per forward pass (None: whole batches; "auto": bounded memory).
        Only memory changes, not the result (up to float32 summation order).
    progress: tqdm progress bar on stderr.
    key: AES-256-CTR key (Base58, 64 hex or 32 bytes) when the weights are encrypted.
    batch_order_range: also compute `Score.range`, the lowest and highest loss over the
        loader's possible batch orders (costs about 3n/4 more SIGReg evaluations per batch).
    """
    return compete([weights], data, seed, keys=[key], model_config=model_config,
                   sig_reg_config=sig_reg_config, max_seq_len=max_seq_len,
                   batch_size=batch_size, framework=framework, device=device,
                   micro_batch_size=micro_batch_size, progress=progress,
                   batch_order_range=batch_order_range, protocol=protocol,
                   contract=contract).scores[0]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`1 - (a/|a|) . (b/|b|)` in float32, as on chain; NaN when either vector is zero."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"target embedding has {b.size} values, the model's embedding has "
                         f"{a.size}")
    with np.errstate(divide="ignore", invalid="ignore"):
        unit_a = a / np.sqrt(np.sum(a * a, dtype=np.float32))
        unit_b = b / np.sqrt(np.sum(b * b, dtype=np.float32))
        return float(np.float32(1.0) - np.dot(unit_a, unit_b))


def pick_winner(losses: Sequence[float]) -> int:
    """The runtime's argmin (SPEC §7): keep the first loss, move on only to a strictly
    smaller one. Ties go to the first; NaN compares below nothing and nothing compares
    below NaN, so a NaN at index 0 wins and a NaN elsewhere is passed over."""
    if not losses:
        raise ValueError("no models to compare")
    best = 0
    for i, loss in enumerate(losses):
        if loss < losses[best]:
            best = i
    return best


def nan_loss_message(losses: Sequence[float], names: Sequence[str] | None = None) -> str | None:
    """One line about the NaN losses of a competition (None when there are none)."""
    bad = [i for i, loss in enumerate(losses) if np.isnan(loss)]
    if not bad:
        return None
    label = ", ".join(names[i] if names is not None else f"#{i}" for i in bad)
    rule = ("index 0 is NaN, so it wins: the runtime's argmin finds nothing below it"
            if bad[0] == 0 else "a NaN loss is passed over by the runtime's argmin")
    return f"NaN loss for {label}: {rule}"


def pair_keys(weights_list: Sequence[object], keys: Sequence[object | None] | None,
              caller: str, noun: str) -> tuple[list[object], list[object | None]]:
    """The weights as a list and one decryption key (or None) for each of them.

    `caller` and `noun` name the function and what it calls the weights in the errors.
    """
    weights_list = list(weights_list)
    if not weights_list:
        raise ValueError(f"{caller} got no {noun}: give at least one")
    keys = [None] * len(weights_list) if keys is None else list(keys)
    if len(keys) != len(weights_list):
        raise ValueError(f"got {len(keys)} keys for {len(weights_list)} {noun}; give one per "
                         f"{noun} (None for an unencrypted one)")
    return weights_list, keys


def compete(weights_list: Sequence[object], data: object, seed: int,
            target: object | None = None, keys: Sequence[object | None] | None = None, *,
            model_config: ModelConfig | None = None, sig_reg_config: SIGRegConfig | None = None,
            max_seq_len: int | None = None, batch_size: int | None = None,
            framework: str = "torch", device: object = None,
            micro_batch_size: int | str | None = None, progress: bool = False,
            batch_order_range: bool = False,
            on_score: Callable[[int, Score], None] | None = None,
            protocol: str | Revision | None = None,
            contract: ScoringContract | None = None) -> Competition:
    """Score every weights on the same data and seed; the lowest loss wins (SPEC §7).

    target: `[D]` embedding the winner is compared with (cosine distance), or None.
    keys: one decryption key (or None) per weights.
    on_score: called with `(index, score)` as each model finishes.
    Other arguments as for `score` (`protocol` or `contract` picks the revision, the parts
    override it). Models are loaded one
    at a time (memory holds one model); the noise is drawn once and shared while it fits a
    1 GiB cache. A NaN loss gets one `NaNLossWarning` line.
    """
    contract = ScoringContract.resolve(contract, protocol, max_seq_len=max_seq_len,
                                       batch_size=batch_size, sig_reg_config=sig_reg_config)
    weights_list, keys = pair_keys(weights_list, keys, "compete", "weights")
    seed = check_seed(seed)
    if isinstance(data, mmap.mmap):
        data = memoryview(data)
    # Refuse bad data before paying for loading any weights.
    next(iter_batches(data, contract.max_seq_len, contract.batch_size))  # type: ignore[arg-type]
    noise = NoiseSource(seed)
    scores: list[Score] = []
    for i, (weights, key) in enumerate(zip(weights_list, keys)):
        backend = load_backend(weights, model_config=model_config, framework=framework,
                               device=device, key=key, contract=contract)
        desc = f"scoring {i + 1}/{len(weights_list)}" if len(weights_list) > 1 else "scoring"
        result = score_backend(backend, data, seed, micro_batch_size=micro_batch_size,
                               batch_order_range=batch_order_range, progress=progress,
                               noise=noise, desc=desc, contract=contract)
        del backend  # free this model before loading the next
        scores.append(result)
        if on_score is not None:
            on_score(i, result)
    losses = [s.loss for s in scores]
    winner = pick_winner(losses)
    message = nan_loss_message(losses, [describe_source(w) if isinstance(
        w, (str, os.PathLike)) else f"#{i}" for i, w in enumerate(weights_list)])
    if message is not None:
        warnings.warn(message, NaNLossWarning, stacklevel=2)
    best = scores[winner]
    distance = None if target is None else cosine_distance(best.embedding, np.asarray(target))
    return Competition(winner, best.loss, best.embedding, distance, losses, scores,
                       contract.protocol)


__all__ = ["Competition", "NaNLossWarning", "Report", "RevisionMismatchWarning", "Score",
           "ScoringContract", "commitment", "compete", "decrypt_weights",
           "encrypt_weights", "score", "validate"]
