"""The torch engine (`engine.Engine`): the part of a run that is torch's, driven by the
framework-free `trainer.Trainer`.

The model is spread over processes by a `distributed.Strategy` (one process, DDP or
FSDP2), which the step never asks about. `--init-from` loads the weights file as the model.
Each micro-batch's randomness is a function of `(seed, step, global micro-batch)`:
torch's RNG is re-seeded before it (dropout) and the SIGReg noise has its own generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soma_models.train import checkpoint as ckpt
from soma_models.train import distributed as distrib
from soma_models.train.config import TrainConfig
from soma_models.train.engine import MicroBatch, load_weights
from soma_models.train.errors import TrainConfigError
from soma_models.train.schedule import micro_seed
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.tokenizer import ArrayBatch, iter_batches
from soma_models.v1.torch import train_step as step_lib
from soma_models.v1.torch.loss import cross_entropy_sum
from soma_models.v1.torch.modules import Model, SIGReg


class TorchEngine:
    """One process's torch side of a run; its methods are `engine.Engine`'s."""

    def __init__(self, device: str | None = None, ctx: distrib.DistContext | None = None):
        """Join the torchrun process group, if any (`ctx`: one already joined)."""
        self.ctx = ctx or distrib.init_distributed(device)

    # ------------------------------------------------------------ processes
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def barrier(self) -> None:
        distrib.barrier(self.ctx)

    def broadcast(self, obj: Any) -> Any:
        return distrib.broadcast_object(self.ctx, obj)

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        return distrib.all_reduce_mean(self.ctx, values)

    def shutdown(self) -> None:
        """Leave the process group (at the very end of a run)."""
        distrib.shutdown(self.ctx)

    # ------------------------------------------------------------ setup
    def build(self, cfg: TrainConfig, model_config: ModelConfig) -> None:
        """The model, its parallel wrapping, SIGReg and the optimizer for the (checked and
        resolved) settings `cfg`."""
        self.cfg = cfg
        self.model_config = model_config
        self.strategy = distrib.strategy(cfg.parallel, self.ctx)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            model = load_weights(Model, cfg.init_from, model_config)
        else:
            model = Model(model_config)  # from-scratch init: Model.reset_parameters
        model.to(self.ctx.device)
        try:
            step_lib.prepare_model(model, activation_checkpointing=cfg.activation_checkpointing,
                                   compile=cfg.compile)
        except ValueError as exc:                 # train_step.check_compile's one line
            raise TrainConfigError(f"--compile: {exc}") from None
        self.model = model  # sharded in place under FSDP
        self.module = self.strategy.wrap(distrib.TrainingModule(model))
        self.sig_reg = SIGReg(SIGRegConfig(slices=cfg.sig_reg_slices,
                                           coefficient=cfg.sig_reg_coefficient))
        self.optimizer = step_lib.make_optimizer(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
            eps=1e-8, implementation=self.strategy.optimizer_implementation)
        # Optimizer-state order (checkpoints name each parameter's state).
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [by_id[id(p)] for group in self.optimizer.param_groups
                            for p in group["params"]]

    # ------------------------------------------------------------ the step
    @staticmethod
    def local_rows(rows: np.ndarray) -> np.ndarray:
        """All of them: a process computes its micro-batches whole."""
        return rows

    def backward(self, micro_batches: Sequence[MicroBatch], step: int) -> tuple[float, float]:
        """Forward and backward of this process's micro-batches of optimizer step `step`
        (`train_step.backward`, the library's step), gradients synced on the last one;
        returns the sums of their losses and cross-entropy sums."""
        loss_total, ce_total = 0.0, 0.0
        accumulation = len(micro_batches)
        for i, micro in enumerate(micro_batches):
            with self.strategy.gradient_sync(self.module, i == accumulation - 1):
                loss, ce_sum = self._micro_batch(micro.batch, step, micro.index, accumulation)
            loss_total += loss
            ce_total += ce_sum
        return loss_total, ce_total

    def _micro_batch(self, batch: ArrayBatch, step: int, micro: int,
                     accumulation: int) -> tuple[float, float]:
        cfg, dev = self.cfg, self.ctx.device
        tokens, targets, pos = step_lib.batch_tensors(batch, dev)
        # Dropout masks depend only on (seed, step, micro-batch): see the module docstring.
        torch.manual_seed(micro_seed(cfg.seed, step, micro, 0))
        noise_gen = torch.Generator().manual_seed(micro_seed(cfg.seed, step, micro, 1))
        noise = torch.randn(self.model_config.embedding_dim, cfg.sig_reg_slices,
                            generator=noise_gen).to(dev)
        rows = None
        positions = tokens.numel()
        if (cfg.sig_reg_coefficient > 0 and cfg.sig_reg_positions
                and cfg.sig_reg_positions < positions):
            # SIGReg on a uniform random subset of positions: an unbiased estimate at a
            # fraction of the cost (cos/sin of positions x slices x points dominates
            # small models' steps).
            rows = torch.randperm(positions, generator=noise_gen)[:cfg.sig_reg_positions]
            rows = rows.to(dev)
        terms = step_lib.backward(self.module, self.sig_reg, tokens, targets, pos,
                                  noise=noise, sig_reg_rows=rows, autocast_bf16=cfg.bf16,
                                  accumulation=accumulation)
        return float(terms.loss.detach()), float(terms.ce_sum.detach())

    def update(self, lr: float, before_step: Callable[[float], None]) -> float:
        """Clip and apply the accumulated gradients at rate `lr`; `before_step(grad_norm)`
        runs first and may raise to stop the step. Returns the global gradient norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = step_lib.apply_update(self.optimizer, self.model.parameters(), clip,
                                          before_step=before_step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------ whole states
    def gather(self) -> Model | None:
        """The plain, unsharded model with the current weights on rank 0 (None elsewhere);
        collective under FSDP, so every rank calls it, once per evaluation/save point."""
        return self.strategy.full_model(self.model)

    @staticmethod
    def non_finite(plain: Model) -> list[str]:
        """The parameters of `plain` holding NaN or Inf."""
        return [name for name, p in plain.named_parameters() if not bool(torch.isfinite(p).all())]

    @staticmethod
    @torch.no_grad()
    def cross_entropy(plain: Model, data: bytes, max_seq_len: int, batch_size: int) -> float:
        """Cross-entropy in nats per predicted token (EOS included, PAD excluded) on `data`,
        cut by the data contract exactly as scoring cuts it (positions from 0). An untrained
        model sits near ln(264) = 5.58."""
        was_training = plain.training
        plain.eval()
        device = next(plain.parameters()).device
        total, count = 0.0, 0
        try:
            for batch in iter_batches(data, max_seq_len, batch_size):
                tokens = torch.from_numpy(batch.token_ids.astype(np.int64)).to(device)
                targets = torch.from_numpy(batch.targets.astype(np.int64)).to(device)
                pos = torch.from_numpy(batch.pos_ids).to(device)
                total += float(cross_entropy_sum(plain(tokens, pos), targets))
                count += batch.num_data_tokens
        finally:
            plain.train(was_training)
        return total / count

    @staticmethod
    def save_weights(plain: Model, path: Path) -> None:
        plain.save(path)

    def optimizer_state(self) -> dict[str, np.ndarray] | None:
        """The whole optimizer state, `{f"{param}.{key}": array}` on rank 0 (collective)."""
        state = self.strategy.optimizer_state(self.model, self.optimizer, self.param_names)
        return None if state is None else {k: v.numpy() for k, v in state.items()}

    def load(self, weights: Path, optimizer_state: dict[str, np.ndarray]) -> None:
        """Put back a checkpoint's weights file and optimizer state (every rank)."""
        plain = load_weights(Model, weights, self.model_config)
        self.strategy.load_state(
            self.model, self.optimizer, self.param_names,
            {k: v.to(self.ctx.device) for k, v in plain.state_dict().items()},
            {k: torch.from_numpy(v) for k, v in optimizer_state.items()})

    @staticmethod
    def rng_state() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return ckpt.capture_rng()

    @staticmethod
    def set_rng_state(tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        ckpt.restore_rng(tensors, state)
