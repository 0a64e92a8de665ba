"""The runtime's causal attention (the -1e4 fill), exact and memory-linear, on fused kernels.

`attention.masked_attention` is the definition: future scores *replaced* by -1e4, then a
softmax over all S keys. Row i has its i + 1 visible scores and n_i = S - 1 - i fill
scores that are exactly -1e4, whose keys carry v_{i+1} .. v_{S-1}. With L_i the
log-sum-exp of the visible scores and F = -1e4, that softmax is exactly

    out_i = (1 - a_i) * causal_i + a_i * mean_{j > i} v_j,
    a_i   = sigmoid(log(n_i) + F - L_i),

where causal_i is what an ordinary causal (-inf masked) kernel returns. For ordinary
weights a_i underflows to exactly 0 in float32 on every row (it does once the row's
largest visible score is ~104 above -1e4), so the fused kernel alone is exact; the work
below only finds, cheaply, the rows or heads where that might not hold and redoes them.

`causal_attention` dispatches between three paths, all linear in S in memory:

1. No autograd, CPU flash op present (evaluation, scoring): `closed_form_attention`.
   The flash op returns L_i with its output; a_i is computed for every row in float64
   and, where it is not 0, the closed form is applied with float64 suffix means of v.
   Rows where a_i (1 - a_i) > `MIXED_ROW_BAND` (the float32 L_i is too coarse there)
   are recomputed the materialised way.
2. Autograd, CPU flash op present (training): the flash op, and every *whole head* in
   which some row has |L_i| > `LOGSUMEXP_EXACT_BOUND` recomputed the materialised way
   (rows in chunks of `EXACT_ROWS_PER_CHUNK`, each checkpointed). That covers every row
   the fill can touch and also heads of huge scores, where the fused backward's float32
   L would leak rounding into the gradients.
3. Otherwise (dropout, CUDA or other devices, dtypes the flash op lacks): PyTorch's SDPA
   with `is_causal`, and the *rows* whose diagonal score q_i . k_i / sqrt(hd) is below
   -1e4 + `FILL_SAFE_MARGIN` recomputed the materialised way (the visible diagonal
   bounds the row maximum from below, so every other row has a_i = 0).

Why the Flax side uses a different kernel, and what both guarantee: docs/attention.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from soma_models.v1.configs import V1_MASK_FILL_VALUE

# exp(-104) is below half of float32's smallest subnormal (2^-150 = exp(-103.97)), so it
# rounds to 0; 8 more for rounding slack between the diagonal we compute and the
# kernel's own scores (|scores| near 1e4 have an ulp of ~1e-3).
FILL_SAFE_MARGIN = 112.0
# Rows recomputed exactly are processed this many at a time: [rows, S] float32 scores.
EXACT_ROWS_PER_CHUNK = 256
# Closed form: rows where the fill's softmax mass a satisfies a (1 - a) above this are
# recomputed exactly (the float32 log-sum-exp would move them by up to ~5e-8 relative).
MIXED_ROW_BAND = 1e-4
# Autograd: heads with a row log-sum-exp beyond this are recomputed exactly (the fused
# backward's probability error is ~|L| x 6e-8 relative, 6e-6 at this bound).
LOGSUMEXP_EXACT_BOUND = 100.0

# PyTorch's CPU flash-attention op returns (output, logsumexp); it is private API, so we
# look it up once and fall back to path 3 (SDPA) when it is absent.
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def future_value_means(v: torch.Tensor) -> torch.Tensor:
    """`mean_{j > i} v_j` for every row i of v `[..., S, hd]` (zero on the last row).

    Accumulated in float64 so that the S-term suffix sums are correctly rounded to
    float32 (a float32 running sum would lose ~S ulps to cancellation).
    """
    seq = v.shape[-2]
    totals = v.double().flip(-2).cumsum(-2).flip(-2)                 # Σ_{j >= i} v_j
    after = torch.cat((totals[..., 1:, :], torch.zeros_like(totals[..., :1, :])), dim=-2)
    count = torch.arange(seq - 1, -1, -1, device=v.device, dtype=torch.float64)
    return (after / count.clamp(min=1.0)[:, None]).to(v.dtype)


def fill_weight(logsumexp: torch.Tensor) -> torch.Tensor:
    """a_i = sigmoid(log(n_i) - 1e4 - L_i) in float64: the softmax mass of the fill.

    logsumexp: `[..., S]` of the visible scores; n_i = S - 1 - i (the last row has none,
    log 0 = -inf gives a = 0). Float64 so that log(n_i) - 1e4 - L_i does not round
    at ulp(1e4) ~ 1e-3 on top of the error L_i already carries.
    """
    seq = logsumexp.shape[-1]
    count = torch.arange(seq - 1, -1, -1, device=logsumexp.device, dtype=torch.float64)
    return torch.sigmoid(torch.log(count) + V1_MASK_FILL_VALUE - logsumexp.double())


def _flash_with_logsumexp_available(q: torch.Tensor, dropout_p: float) -> bool:
    """The CPU flash op (output and log-sum-exp) applies: CPU, float, no dropout."""
    return (_FLASH_WITH_LSE is not None and q.device.type == "cpu" and dropout_p == 0.0
            and q.dtype in (torch.float32, torch.float64))


def _exact_rows_one_head(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rows: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Materialised attention for query rows `rows` `[n]` of one (batch, head).

    q_rows: `[n, hd]`, k, v: `[S, hd]` -> `[n, hd]`. Memory `[n, S]`.
    """
    scores = (q_rows @ k.transpose(0, 1)) / math.sqrt(q_rows.shape[-1])
    key_index = torch.arange(k.shape[0], device=k.device)
    scores = scores.masked_fill(key_index[None, :] > rows[:, None], V1_MASK_FILL_VALUE)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                dropout_p: float) -> torch.Tensor:
    """Exact attention output for selected rows `[n, 3]` (batch, head, query), sorted.

    Rows are grouped per (batch, head) so that keys and values are used in place (no
    `[n, S, hd]` gather). Under autograd (and without dropout, whose mask would not be
    replayed) each chunk is checkpointed: the saved state stays O(hd) per row instead of
    the `[rows, S]` softmax, so memory stays linear in S.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    pairs, counts = torch.unique_consecutive(rows[:, :2], dim=0, return_counts=True)
    outputs = []
    for (b, h), pair_rows in zip(pairs.tolist(), rows[:, 2].split(counts.tolist())):
        for chunk in pair_rows.split(EXACT_ROWS_PER_CHUNK):
            args = (q[b, h, chunk], k[b, h], v[b, h], chunk, dropout_p)
            if grad and dropout_p == 0.0:
                outputs.append(checkpoint(_exact_rows_one_head, *args, use_reentrant=False))
            else:
                outputs.append(_exact_rows_one_head(*args))
    return torch.cat(outputs)


# Data dependent (whether any row is selected, and which), so `torch.compile` could not
# capture it in a graph anyway: it runs eagerly between two compiled graphs, without the
# tracer's warning about the `bool()` of a tensor.
@torch.compiler.disable
def _replace_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  selected: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """`out` with the rows where `selected` `[B, H, S]` is True recomputed exactly."""
    if not bool(selected.any()):
        return out
    rows = selected.nonzero()
    exact = _exact_rows(q, k, v, rows, dropout_p)
    return out.index_put(tuple(rows.unbind(-1)), exact)


def fill_affected_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean `[B, H, S]`: rows whose diagonal score does not rule out the -1e4 fill."""
    with torch.no_grad():
        # The bound is scaled instead of every score (one kernel less per layer); the
        # two round differently by far less than the margin's rounding slack.
        diagonal = (q * k).sum(-1)
        return diagonal < (V1_MASK_FILL_VALUE + FILL_SAFE_MARGIN) * math.sqrt(q.shape[-1])


@torch.compiler.disable       # data dependent throughout; evaluation runs it eagerly anyway
def closed_form_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The runtime's attention for every row from the flash kernel's log-sum-exp.

    q, k, v: `[B, H, S, hd]`, no autograd, no dropout. The kernel's float32 L_i is
    rounded to ulp(|L_i|)/2 (~5e-4 near the fill), which moves a_i by a_i (1 - a_i) x
    that; rows where a_i (1 - a_i) > `MIXED_ROW_BAND` -- the visible maximum within a
    few units of -1e4 + log n_i, where visible and filled keys really mix -- are
    recomputed the materialised way. Every other row is exact as it stands.
    """
    causal, logsumexp = _FLASH_WITH_LSE(q, k, v, 0.0, True)           # [B,H,S,hd], [B,H,S]
    weight = fill_weight(logsumexp)                                   # float64 [B, H, S]
    if not bool((weight > 0.0).any()):
        return causal                                                 # the ordinary case
    mixed = weight * (1.0 - weight) > MIXED_ROW_BAND
    out = causal.clone()
    # One (batch, head) at a time, and only where the fill has any weight: the float64
    # suffix sums then cost one head's `[S, hd]` of memory, not the whole tensor's.
    for b, h in (weight > 0.0).any(-1).nonzero().tolist():
        correction = future_value_means(v[b, h]) - causal[b, h]
        out[b, h].addcmul_(weight[b, h, :, None].to(causal.dtype), correction)
    return _replace_rows(out, q, k, v, mixed, 0.0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Exact causal attention (the runtime's -1e4 fill) in linear memory.

    q, k, v: `[B, H, S, hd]` -> `[B, H, S, hd]`.

    1. No autograd: `closed_form_attention` (flash op + closed-form fill).
    2. Autograd: the flash op, and whole heads recomputed the exact way where any row
       has |L_i| > `LOGSUMEXP_EXACT_BOUND`. That covers every row the fill can touch
       (their L_i is near -1e4), and also heads of huge scores generally: the fused
       backward rebuilds probabilities as exp(s - L) from a float32 L, whose rounding
       (relative |L| x 6e-8) would otherwise leak into the gradients.
    3. Dropout, or no CPU flash op (e.g. CUDA): PyTorch's SDPA, and the rows whose
       diagonal score does not rule the fill out recomputed exactly.
    """
    if not _flash_with_logsumexp_available(q, dropout_p):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return _replace_rows(out, q, k, v, fill_affected_rows(q, k), dropout_p)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return closed_form_attention(q, k, v)
    out, logsumexp = _FLASH_WITH_LSE(q, k, v, 0.0, True)
    heads = (logsumexp.detach().abs() > LOGSUMEXP_EXACT_BOUND).any(-1, keepdim=True)
    return _replace_rows(out, q, k, v, heads.expand(logsumexp.shape), 0.0)


