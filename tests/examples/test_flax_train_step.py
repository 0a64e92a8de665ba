"""examples/flax_train_step.py: its jitted AdamW step lowers the on-chain loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from soma_models.v1.configs import ModelConfig, SIGRegConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flax_train_step.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("flax_train_step", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_steps_lower_the_loss() -> None:
    example = _load_example()
    corpus = example.source_corpus()
    assert len(corpus) > 10_000          # the package's own sources, read at run time
    config = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=4)
    losses = example.train(config, steps=8, seq_len=32, batch_size=4, data=corpus,
                           sig_reg_config=SIGRegConfig(slices=32), log=False)
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    # Untrained, the loss is about ln(264); a few AdamW steps at 3e-3 must bring it down.
    assert abs(losses[0] - np.log(264)) < 0.3
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
