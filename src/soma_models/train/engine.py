"""What a framework provides to the trainer: an engine (framework-free protocol).

`trainer.Trainer` owns everything a run does that no framework decides: the settings,
the data and its order, the schedule, the loop, when to evaluate and save, the run
folder, checkpoints and the resume check, metrics and the summary. The framework's half
is an engine, which the trainer drives; `torch_engine.TorchEngine` is torch's and
`flax_engine.FlaxEngine` Flax's (`TrainConfig.framework` picks one; any other engine
plugs in as `Trainer(cfg, engine=...)`).

Processes are the engine's (torchrun's or JAX's): the main process writes every file; the
trainer calls the collective methods (marked below) on every process, in the same order.
`rank` / `world_size` are how the trainer splits a step's micro-batches (global
micro-batch `m` goes to rank `m % world_size`): under torch, one share per process; under
Flax, one share in all (rank 0 of 1), since its mesh spans every process's devices and
splits the rows of each micro-batch itself, each process reading its block of rows
(`local_rows`).

`plain` below is the engine's plain, unsharded model with the current weights: what
`soma_models.v1.scoring.score` takes, and what is saved as the canonical weights file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from soma_models.train.config import TrainConfig
from soma_models.train.errors import TrainError
from soma_models.v1.configs import ModelConfig
from soma_models.v1.tokenizer import ArrayBatch


def load_weights(model_cls: Any, path: str | Path, model_config: ModelConfig) -> Any:
    """`model_cls.load(path, model_config)` (either framework's `Model`), a file it cannot
    load refused as one `TrainError` line."""
    try:
        return model_cls.load(path, model_config)
    except (OSError, ValueError) as exc:
        raise TrainError(" ".join(str(exc).split())) from None


class MicroBatch(NamedTuple):
    """One micro-batch of a step, as one process sees it."""

    index: int          # global micro-batch index within the step (seeds its randomness)
    rows: int           # its rows in all (over every process)
    batch: ArrayBatch   # the rows of it this process read (`Engine.local_rows`), [R', S]


class Engine(Protocol):
    """A framework's half of a training run."""

    rank: int               # this process's share of each step's micro-batches
    world_size: int         # the number of shares
    is_main: bool           # the process that writes files (process 0)
    module: Any             # the training module (what `Trainer.module` shows)
    optimizer: Any

    # ------------------------------------------------------------ processes
    def barrier(self) -> None:
        """Collective: wait for every process."""

    def broadcast(self, obj: Any) -> Any:
        """Collective: rank 0's small Python value (a flag, a message) on every rank."""

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """Collective: a few scalars averaged over processes."""

    def shutdown(self) -> None:
        """Leave the process group at the end of a run."""

    # ------------------------------------------------------------ setup
    def build(self, cfg: TrainConfig, model_config: ModelConfig) -> None:
        """Build the model (from scratch with `cfg.seed`, or `cfg.init_from` loaded as is),
        the optimizer (AdamW groups of the library's train_step) and SIGReg."""

    # ------------------------------------------------------------ the step
    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """Of a micro-batch's chunk indices `[R]`, those this process reads, in order (all
        of them, unless the engine spreads one micro-batch over several processes)."""

    def backward(self, micro_batches: Sequence[MicroBatch], step: int) -> tuple[float, float]:
        """Forward and backward of this process's micro-batches of optimizer step `step`,
        gradients accumulated (each loss divided by their number) and synced across
        processes after the last. Randomness (dropout, SIGReg noise and positions) is a
        function of `(cfg.seed, step, index)` (`schedule.micro_seed`). Returns the sum of
        the micro-batches' losses and the sum of the cross-entropy sums of the rows this
        process read (so that `all_reduce_mean` of them and of the token counts gives
        the global cross-entropy per token)."""

    def update(self, lr: float, before_step: Callable[[float], None]) -> float:
        """Apply the accumulated gradients at rate `lr` after clipping to `cfg.grad_clip`
        (0: off); `before_step(global grad norm)` runs first and may raise, leaving the
        weights untouched. Clears the gradients; returns the norm."""

    # ------------------------------------------------------------ whole states
    def gather(self) -> Any:
        """Collective: `plain` on rank 0 (None elsewhere). The trainer calls it once per
        evaluation/save point."""

    def non_finite(self, plain: Any) -> list[str]:
        """The names of `plain`'s parameters holding NaN or Inf."""

    def cross_entropy(self, plain: Any, data: bytes, max_seq_len: int,
                      batch_size: int) -> float:
        """Nats per predicted token (EOS included, PAD excluded) of `plain` on `data`, cut
        by the data contract as scoring cuts it, in evaluation mode."""

    def save_weights(self, plain: Any, path: Path) -> None:
        """Write `plain` as a canonical weights file."""

    def optimizer_state(self) -> dict[str, np.ndarray] | None:
        """Collective: the whole optimizer state as `{f"{param}.{key}": array}` on rank 0
        (None elsewhere), parameters named as in the weights file."""

    def load(self, weights: Path, optimizer_state: dict[str, np.ndarray]) -> None:
        """Put back a weights file and an `optimizer_state()` (every rank)."""

    def rng_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The process's RNG states as `(byte arrays named "rng.*", JSON-able values)`."""

    def set_rng_state(self, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Put back what `rng_state` returned."""
