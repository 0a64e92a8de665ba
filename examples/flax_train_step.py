"""Train a small V1 model in Flax NNX on this package's own source code, a few steps.

    python examples/flax_train_step.py [--steps 30]

Each step is one jitted call: the on-chain loss (cross-entropy over every position plus
0.02 * SIGReg, noise drawn from the SIGReg module's rngs), its gradients, and an AdamW
update. The printed loss should fall from about ln(264) ~ 5.6 within a few dozen steps.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

import jax
import optax
from flax import nnx

import soma_models
from soma_models.v1.configs import ModelConfig, SIGRegConfig, preset
from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
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
    """A fresh model, its SIGReg (noise from its own rng stream) and an AdamW optimizer."""
    rngs = nnx.Rngs(seed)
    model = Model(config, rngs=rngs)
    sig_reg = SIGReg(sig_reg_config or SIGRegConfig(), rngs=rngs)
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate, weight_decay=0.01), wrt=nnx.Param)
    return model, sig_reg, optimizer


@nnx.jit
def train_step(model: Model, sig_reg: SIGReg, optimizer: nnx.Optimizer, token_ids: jax.Array,
               targets: jax.Array, pos_ids: jax.Array) -> jax.Array:
    """One AdamW step on the on-chain loss; returns the loss before the update."""

    # sig_reg goes in as an argument, not a closure: drawing its noise advances its rng
    # stream, and NNX transforms only let state passed through them change.
    def loss_fn(model: Model, sig_reg: SIGReg) -> jax.Array:
        loss, _ = compute_loss(model, sig_reg, token_ids, targets, pos_ids)
        return loss

    loss, grads = nnx.value_and_grad(loss_fn)(model, sig_reg)   # grads w.r.t. model only
    optimizer.update(model, grads)
    return loss


def train(config: ModelConfig, steps: int, seq_len: int, batch_size: int, seed: int = 0,
          data: bytes | None = None, sig_reg_config: SIGRegConfig | None = None,
          log: bool = True) -> list[float]:
    model, sig_reg, optimizer = make_training(config, seed, sig_reg_config=sig_reg_config)
    model.train()
    stream = batches(source_corpus() if data is None else data, seq_len, batch_size)
    losses = []
    for step in range(steps):
        batch = next(stream)
        loss = float(train_step(model, sig_reg, optimizer, batch.token_ids, batch.targets,
                                batch.pos_ids))
        losses.append(loss)
        if log:
            print(f"step {step:3d}  loss {loss:.4f}")
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
