"""PyTorch scoring backend: a loaded model's raw per-piece terms (see `soma_models.v1.scoring`).

Scoring runs the model in eval mode (no dropout), without autograd, in strict float32:
TF32 matmuls and reduced-precision reductions are switched off for the duration, as the
chain's float32 runtime requires (SPEC §9), and restored afterwards.

`row_terms(..., precision="bf16")` is the approximate pass of screening's prescreen
(`soma_models.v1.prescreen`): the encoder and predictor run under bfloat16 autocast, the
loss, SIGReg and embedding terms are then taken in float32 from the bf16 outputs. Its
results are not the chain's; screening re-scores in float32 whatever they cannot settle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np
import torch

from soma_models.v1.backend import PieceTerms, RowTerms
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.torch.loss import cross_entropy_rows, cross_entropy_sum
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import sig_reg_position_values, sig_reg_statistic


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """No TF32 and no reduced-precision float32 matmuls inside the block."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the model's own mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def autocast_bf16(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast on `device` (CUDA with bf16 support, or the CPU, where it runs
    everywhere but is slower than float32 without native bf16 units)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device}: no bfloat16 support, so no bf16 prescreen on it")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 prescreen runs on CUDA and CPU devices, not {device.type}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class TorchBackend:
    """A `ScoringBackend` around a torch `Model`."""

    precisions = ("float32", "bf16")

    def __init__(self, model: Model, sig_reg_config: SIGRegConfig):
        self.model = model
        self.config: ModelConfig = model.config
        self.sig_reg_config = sig_reg_config
        self.device = model.embedding.weight.device
        self.on_cpu = self.device.type == "cpu"

    @classmethod
    def open(cls, source: object, *, model_config: ModelConfig | None,
             sig_reg_config: SIGRegConfig, device: object = None) -> Self:
        """source: a torch `Model`, a dict of canonical arrays, a path or bytes."""
        if isinstance(source, torch.nn.Module):
            if not isinstance(source, Model):
                raise TypeError(f"expected a soma_models V1 torch Model, got "
                                f"{type(source).__name__}")
            if model_config is not None and model_config != source.config:
                raise ValueError("model_config differs from the loaded model's config")
            model = source if device is None else source.to(device)
        elif isinstance(source, dict):
            model = Model.from_arrays(source, model_config, device=device)  # type: ignore[arg-type]
        else:
            model = Model.load(source, model_config, device=device)  # type: ignore[arg-type]
        return cls(model, sig_reg_config)

    def _inputs(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(np.asarray(a, dtype=np.int64)).to(self.device)
                     for a in (token_ids, targets, pos_ids))  # type: ignore[return-value]

    def piece_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                    noises: Sequence[np.ndarray]) -> PieceTerms:
        device = self.device
        tokens, target, positions = self._inputs(token_ids, targets, pos_ids)
        with torch.no_grad(), strict_float32(), eval_mode(self.model):
            reps = self.model.encode(tokens, positions)                  # [R, S, D]
            ce_sum = float(cross_entropy_sum(self.model.predict(reps), target))
            n_positions = reps.shape[0] * reps.shape[1]
            sig_reg_sums = np.array([
                float(sig_reg_statistic(reps, torch.from_numpy(noise).to(device),
                                        self.sig_reg_config)) * n_positions
                for noise in noises
            ])
            embedding_sum = reps.mean(dim=1).sum(dim=0).double().cpu().numpy()
        return PieceTerms(ce_sum, sig_reg_sums, embedding_sum)

    def row_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                  noises: Sequence[np.ndarray], noise_index: np.ndarray, *,
                  precision: str = "float32") -> RowTerms:
        if precision not in self.precisions:
            raise ValueError(f"precision must be one of {', '.join(self.precisions)}, "
                             f"got {precision!r}")
        tokens, target, positions = self._inputs(token_ids, targets, pos_ids)
        noise_index = np.asarray(noise_index)
        approximate = (autocast_bf16(self.device) if precision == "bf16"
                       else contextlib.nullcontext())
        with torch.no_grad(), strict_float32(), eval_mode(self.model):
            with approximate:
                reps = self.model.encode(tokens, positions)              # [R, S, D]
                logits = self.model.predict(reps)                        # [R, S, V]
            # bf16 outputs widen here: the sums below are float32 either way.
            reps = reps.float()
            ce_sums = cross_entropy_rows(logits.float(), target)
            sig_reg_sums = torch.zeros(reps.shape[0], dtype=torch.float64)
            for j, noise in enumerate(noises):
                rows = np.flatnonzero(noise_index == j)
                if rows.size == 0:
                    continue
                values = sig_reg_position_values(
                    reps[torch.from_numpy(rows).to(self.device)],
                    torch.from_numpy(noise).to(self.device), self.sig_reg_config)
                sig_reg_sums[torch.from_numpy(rows)] = values.sum(dim=1).double().cpu()
            embedding_means = reps.mean(dim=1).double().cpu().numpy()
        return RowTerms(ce_sums.double().cpu().numpy(), sig_reg_sums.numpy(), embedding_means)
