"""Train a small V1 model in Flax NNX on this package's own source code, a few steps.

    python examples/flax_train_step.py [--steps 30]

Each step is one jitted call of the library's step (`soma_models.v1.flax.train_step`,
the one `ShardedTrainStep` runs): the on-chain loss (cross-entropy over every position
plus 0.02 * SIGReg, fresh noise each step), its gradients, and an AdamW update. The printed loss should fall from about ln(264) ~ 5.6 within a few dozen steps.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Iterator
from pathlib import Path

import jax
from flax import nnx

import soma_models
from soma_models.v1.configs import ModelConfig, SIGRegConfig, preset
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.train_step import make_optimizer, train_step
from soma_models.v1.tokenizer import ArrayBatch, iter_batches


def source_corpus() -> bytes:
    """The package's own Python sources, read at run time: a small, always-present corpus."""
    root = Path(soma_models.__file__).parent
    return b"\n".join(path.read_bytes() for path in sorted(root.rglob("*.py")))


def batches(data: bytes, seq_len: int, batch_size: int) -> Iterator[ArrayBatch]:
    """Full batches of the data contract, cycled forever (the ragged last one is skipped
    so every step has the same shape and the step compiles once)."""
    full = [b for b in iter_batches(data, seq_len, batch_size) if b.token_ids.shape[0] == batch_size]
    if not full:
        raise ValueError(f"{len(data)} bytes do not fill one batch of {batch_size} x {seq_len}")
    return itertools.cycle(full)


def make_training(config: ModelConfig, seed: int = 0, learning_rate: float = 3e-3,
                  sig_reg_config: SIGRegConfig | None = None):
    """A fresh model, its SIGReg, an AdamW optimizer (weight decay on matrices only) and
    the library's step, jitted with the model's structure bound."""
    model = Model(config, rngs=nnx.Rngs(seed))
    sig_reg = SIGReg(sig_reg_config or SIGRegConfig())
    optimizer = make_optimizer(learning_rate, weight_decay=0.01)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = jax.jit(functools.partial(train_step, graphdef, sig_reg, optimizer))
    return model, sig_reg, optimizer, params, rest, step


def train(config: ModelConfig, steps: int, seq_len: int, batch_size: int, seed: int = 0,
          data: bytes | None = None, sig_reg_config: SIGRegConfig | None = None,
          log: bool = True) -> list[float]:
    model, sig_reg, optimizer, params, rest, step = make_training(
        config, seed, sig_reg_config=sig_reg_config)
    opt_state = optimizer.init(params)
    stream = batches(source_corpus() if data is None else data, seq_len, batch_size)
    key = jax.random.key(seed + 1)
    losses = []
    for step_index in range(steps):
        batch = next(stream)
        # Fresh SIGReg noise every step, as in training on chain-like data.
        key, noise_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (config.embedding_dim, sig_reg.config.slices))
        params, rest, opt_state, loss = step(params, rest, opt_state, batch.token_ids,
                                             batch.targets, batch.pos_ids, noise)
        losses.append(float(loss))
        if log:
            print(f"step {step_index:3d}  loss {losses[-1]:.4f}")
    nnx.update(model, params, rest)    # the trained weights, e.g. for model.save(...)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="tiny", help="model size (tiny, small, medium, v1)")
    args = parser.parse_args()
    config = preset(args.preset)
    losses = train(config, args.steps, args.seq_len, args.batch_size)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")


if __name__ == "__main__":
    main()
