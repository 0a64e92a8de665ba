"""An independent NumPy computation of the chain's score, written from SPEC §2-§6 only.

Nothing here imports the package's tokenizer, model, loss or SIGReg: batches are cut
from the bytes directly, the forward pass is plain NumPy in float64 (except the RoPE
angle, which the spec defines in float32), the noise comes from `arrgen` directly.
Variants of the two easy-to-get-wrong rules (the cross-entropy denominator and the
weighting of batches) are parameters, so tests can show that the wrong rules give other
numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import arrgen
import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # torch-only installs: slower, same values
    _erf = np.vectorize(math.erf, otypes=[np.float64])

PAD, EOS = 256, 257
MASK_FILL = -1.0e4
QUERY_BLOCK = 512
EPS = 1e-5


@dataclass(frozen=True)
class Sizes:
    dim: int
    heads: int
    layers: int
    hidden: int
    vocab: int = 264
    max_wavelength: float = 10_000.0


def batches(data: bytes, seq_len: int, batch_size: int):
    """Yield (tokens, targets, positions) int arrays `[rows, seq_len]` per SPEC §2."""
    n = len(data)
    chunks = []
    for start in range(0, n, seq_len):
        piece = list(data[start:start + seq_len])
        tokens = piece[:]
        if len(piece) < seq_len:  # only the final chunk can be short
            tokens.append(EOS)
        tokens += [PAD] * (seq_len - len(tokens))
        positions = [start + i if i < len(piece) else start + len(piece) for i in range(seq_len)]
        chunks.append((tokens, tokens[1:] + [PAD], positions))
    for first in range(0, len(chunks), batch_size):
        group = chunks[first:first + batch_size]
        yield tuple(np.array([c[i] for c in group], dtype=np.int64) for i in range(3))


def _layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def _rope(x, positions, max_wavelength):
    """x `[B, S, H, hd]`; the angle is float32 division, as on chain."""
    hd = x.shape[-1]
    half = hd // 2
    frac = (np.float32(2.0) * np.arange(half, dtype=np.float32)) / np.float32(hd)
    timescale = np.float32(max_wavelength) ** frac.astype(np.float64)
    angle = positions.astype(np.float32)[:, :, None] / timescale.astype(np.float32)
    angle = angle.astype(np.float64)[:, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], axis=-1)


def _attention(h, positions, w, prefix, sizes):
    bsz, seq, dim = h.shape
    hd = dim // sizes.heads

    def proj(name):
        return h @ w[f"{prefix}.{name}.weight"] + w[f"{prefix}.{name}.bias"]

    q = _rope(proj("query").reshape(bsz, seq, sizes.heads, hd), positions, sizes.max_wavelength)
    k = _rope(proj("key").reshape(bsz, seq, sizes.heads, hd), positions, sizes.max_wavelength)
    v = proj("value").reshape(bsz, seq, sizes.heads, hd)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))          # [B, H, S, hd]
    context = np.empty_like(q)
    # Query rows a block at a time, so that sequences of 8192 fit in memory; each row's
    # softmax still sees every key (future ones filled, not dropped).
    for first in range(0, seq, QUERY_BLOCK):
        rows = slice(first, min(seq, first + QUERY_BLOCK))
        scores = (q[:, :, rows] @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)
        future = np.arange(seq)[None, :] > np.arange(seq)[rows, None]
        scores = np.where(future, MASK_FILL, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        weights = scores / scores.sum(-1, keepdims=True)
        context[:, :, rows] = weights @ v
    context = context.transpose(0, 2, 1, 3).reshape(bsz, seq, dim)
    return context @ w[f"{prefix}.output.weight"] + w[f"{prefix}.output.bias"]


def encode(w: dict[str, np.ndarray], tokens, positions, sizes: Sizes) -> np.ndarray:
    """Representations `[B, S, D]` (float64) from canonical arrays."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    x = w["embedding.weight"][tokens]
    for layer in range(sizes.layers):
        p = f"encoder.layers.{layer}"
        h = _layer_norm(x, w[f"{p}.norm_1.gamma"], w[f"{p}.norm_1.beta"])
        x = x + _attention(h, positions, w, f"{p}.attention", sizes)
        h = _layer_norm(x, w[f"{p}.norm_2.gamma"], w[f"{p}.norm_2.beta"])
        inner = h @ w[f"{p}.pwff.linear_inner.weight"] + w[f"{p}.pwff.linear_inner.bias"]
        gelu = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = x + gelu @ w[f"{p}.pwff.linear_outer.weight"] + w[f"{p}.pwff.linear_outer.bias"]
    return _layer_norm(x, w["final_norm.gamma"], w["final_norm.beta"])


def cross_entropy_terms(w, reps, targets) -> tuple[float, int]:
    """(sum over non-PAD targets of -log p(target), number of non-PAD targets)."""
    logits = reps @ np.asarray(w["predictor.weight"], np.float64) + w["predictor.bias"]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    keep = targets != PAD
    return float(-picked[keep].sum()), int(keep.sum())


def sig_reg(reps, noise, t_max: float, points: int) -> float:
    """SPEC §5 in float64: mean over positions of slices * sum_j w_j ((c - phi)^2 + z^2)."""
    slices = noise.shape[1]
    dt = t_max / (points - 1)
    directions = noise.astype(np.float64) / np.linalg.norm(noise.astype(np.float64), axis=0)
    p = reps.reshape(-1, reps.shape[-1]) @ directions
    total = np.zeros(p.shape[0])
    for j in range(points):
        t = j * dt
        phi = math.exp(-t * t / 2)
        weight = phi * (dt if j in (0, points - 1) else 2 * dt)
        c = np.cos(p * t).mean(-1)
        z = np.sin(p * t).mean(-1)
        total += weight * ((c - phi) ** 2 + z**2)
    return float((slices * total).mean())


def noise(seed: int, k: int, dim: int, slices: int) -> np.ndarray:
    """Batch k's noise: the stream seed is `seed + k` in u64 arithmetic (wraps at 2^64)."""
    return np.asarray(arrgen.normal_array((seed + k) % 2**64, [dim, slices], 0.0, 1.0),
                      dtype=np.float32)


@dataclass
class BatchResult:
    ce_sum: float
    non_pad: int
    positions: int
    rows: int
    reps: np.ndarray


def per_batch(w, data, sizes: Sizes, seq_len: int, batch_size: int) -> list[BatchResult]:
    out = []
    for tokens, targets, positions in batches(data, seq_len, batch_size):
        reps = encode(w, tokens, positions, sizes)
        ce_sum, non_pad = cross_entropy_terms(w, reps, targets)
        out.append(BatchResult(ce_sum, non_pad, tokens.size, tokens.shape[0], reps))
    return out


def reference_score(w, data, seed, sizes: Sizes, seq_len: int, batch_size: int, *,
                    slices: int, t_max: float = 3.0, points: int = 17,
                    coefficient: float = 0.02, denominator: str = "all",
                    weighting: str = "batch") -> tuple[float, np.ndarray]:
    """(loss, embedding `[D]`).

    denominator: "all" (the chain: every position) or "non_pad" (ignore_index mean).
    weighting: "batch" (the chain: every batch weighs the same) or "position".
    """
    losses, embeddings, weights = [], [], []
    for k, b in enumerate(per_batch(w, data, sizes, seq_len, batch_size)):
        ce = b.ce_sum / (b.positions if denominator == "all" else b.non_pad)
        losses.append(ce + coefficient * sig_reg(b.reps, noise(seed, k, sizes.dim, slices),
                                                 t_max, points))
        embeddings.append(b.reps.mean(axis=1).mean(axis=0))
        weights.append(1.0 if weighting == "batch" else b.positions)
    weights = np.asarray(weights) / np.sum(weights)
    return float(np.dot(weights, losses)), np.tensordot(weights, np.array(embeddings), axes=1)
