"""Measuring a run: held-out cross-entropy, the exact on-chain score, a JSONL log."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soma_models.atomic import atomic_write
from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.scoring import Score, score
from soma_models.v1.tokenizer import iter_batches
from soma_models.v1.torch.loss import cross_entropy_sum


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so `tail -f` works."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, ["".join(k + "\n" for k in kept).encode("utf-8")])


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@torch.no_grad()
def heldout_cross_entropy(model: torch.nn.Module, data: bytes, max_seq_len: int,
                          batch_size: int) -> float:
    """Cross-entropy in nats per predicted token (EOS included, PAD excluded) on `data`.

    `data` is cut by the data contract exactly as scoring cuts it (positions from 0).
    An untrained model sits near ln(264) = 5.58.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in iter_batches(data, max_seq_len, batch_size):
            tokens = torch.from_numpy(batch.token_ids.astype(np.int64)).to(device)
            targets = torch.from_numpy(batch.targets.astype(np.int64)).to(device)
            pos = torch.from_numpy(batch.pos_ids).to(device)
            total += float(cross_entropy_sum(model(tokens, pos), targets))
            count += batch.num_data_tokens
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def exact_score(model: torch.nn.Module, data: bytes, seed: int, *,
                contract: ScoringContract | None = None, max_seq_len: int | None = None,
                batch_size: int | None = None,
                sig_reg_config: SIGRegConfig | None = None) -> Score:
    """The on-chain score of `model` on `data` with `seed` (SPEC §6), by
    `soma_models.v1.scoring.score` itself: the trainer reports the number the chain would.

    contract: the run's revision and scoring settings (None: the process-wide revision's);
    the parts override it. `Score.protocol` names the contract's revision."""
    was_training = model.training
    model.eval()
    try:
        return score(model, data, seed, model_config=model.config, contract=contract,
                     sig_reg_config=sig_reg_config, max_seq_len=max_seq_len,
                     batch_size=batch_size)
    finally:
        model.train(was_training)
