"""Shared helpers for the trainer tests: a small corpus and a very small model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soma_models.train.trainer import TrainConfig

# These models are tiny: one thread is fastest, and on a busy 2-core CI machine torch's
# second thread mostly waits for the other at every op.
torch.set_num_threads(1)

# Small enough that a step takes milliseconds; still every part of the V1 architecture.
SMALL_SIZES = dict(config="tiny", embedding_dim=32, num_layers=1, num_heads=2,
                   pwff_hidden_dim=64)


def write_corpus(root: Path) -> Path:
    """A few text files (one nested, one empty, one hidden) written by the test itself."""
    (root / "sub").mkdir(parents=True)
    sentences = [f"line {i}: the quick brown fox number {i * 7 % 13} jumps.\n" for i in range(40)]
    (root / "a.txt").write_text("".join(sentences[:25]))
    (root / "b.md").write_text("# heading\n" + "".join(sentences[10:30]))
    (root / "sub" / "c.py").write_text("def f(x):\n    return x * 2\n" * 20)
    (root / "sub" / "d.txt").write_text("".join(reversed(sentences)))
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden").write_text("never read")
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def small_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=[str(corpus)], out_dir=str(out), seq_len=32, batch_size=4, steps=6,
                  warmup_steps=2, eval_every=3, eval_batch_size=8, checkpoint_every=3,
                  score_seq_len=64, score_batch_size=4, sig_reg_slices=32, progress=False,
                  plot=False, lr=3e-3, **SMALL_SIZES)
    values.update(overrides)
    return TrainConfig(**values)
