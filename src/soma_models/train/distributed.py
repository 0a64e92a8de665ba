"""Past one machine: process groups, and the strategies (one process, DDP, FSDP2) that
wrap the model, sync gradients and gather or restore whole states.

Launch with `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without
those variables everything here degrades to a single process. The backend is NCCL when
CUDA is available and gloo otherwise (CPU).

* ``ddp``: every process holds the whole model; gradients are all-reduced (averaged).
* ``fsdp``: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters,
  gradients and optimizer state across processes, one group per transformer block plus
  a root group (embedding, final norm, predictor). For models that do not fit one device.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from soma_models.train.config import PARALLEL_MODES
from soma_models.v1.torch.modules import Model


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's `obj` on every rank (small Python values: flags, error messages)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(ctx: DistContext, values: list[float]) -> list[float]:
    """Average a few scalars over processes (for logging)."""
    if not ctx.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return (tensor / ctx.world_size).tolist()


class TrainingModule(nn.Module):
    """`Model` with one `forward` returning both representations and logits.

    The loss needs the representations (SIGReg) and the logits (cross-entropy). DDP and
    FSDP2 hook `forward`, so both must come out of a single call to it.
    """

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor, pos_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        representations = self.model.encode(token_ids, pos_ids)
        return representations, self.model.predict(representations)


class Strategy:
    """How the model is spread over processes, behind one interface, so that the training
    step never asks which (no isinstance, no mode branches there):

    * `wrap` the training module once;
    * `gradient_sync(module, enabled)`: the context for one micro-batch's backward, which
      all-reduces gradients only when `enabled` (the last of an accumulation);
    * `full_model`: the plain, unsharded `Model` with the current weights (rank 0);
    * `optimizer_state` / `load_state`: whole (unsharded) states, for checkpoints.

    This base class is one process holding the whole model.
    """

    #: `train_step.make_optimizer`'s implementation ("auto": the fused kernel where it runs).
    optimizer_implementation = "auto"

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def wrap(self, module: TrainingModule) -> nn.Module:
        return module

    def gradient_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        return contextlib.nullcontext()

    def full_model(self, model: Model) -> Model | None:
        """The whole `Model` on rank 0 (None elsewhere); collective where sharded. Here the
        live model itself (no copy)."""
        return model if self.ctx.is_main else None

    def optimizer_state(self, model: Model, optimizer: torch.optim.Optimizer,
                        names: list[str]) -> dict[str, torch.Tensor] | None:
        """Optimizer moments as `{f"{param}.{key}": tensor}` on CPU (rank 0).

        `names` are the parameter names in optimizer order."""
        out = {}
        for name, param in zip(names, _group_params(optimizer), strict=True):
            for key, value in optimizer.state.get(param, {}).items():
                out[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu()
        return out

    def load_state(self, model: Model, optimizer: torch.optim.Optimizer, names: list[str],
                   model_state: dict[str, torch.Tensor],
                   optim_state: dict[str, torch.Tensor]) -> None:
        """Put whole model and optimizer states back (every rank passes the same)."""
        with torch.no_grad():
            own = model.state_dict()
            for key, tensor in model_state.items():
                own[key].copy_(tensor)
        per_param = _per_parameter(optim_state)
        state = {i: per_param[name] for i, name in enumerate(names) if name in per_param}
        groups = []
        index = 0
        for group in optimizer.param_groups:
            count = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(index, index + count))})
            index += count
        optimizer.load_state_dict({"state": state, "param_groups": groups})


class DataParallel(Strategy):
    """DDP: every process holds the whole model; gradients are all-reduced (averaged)."""

    def wrap(self, module: TrainingModule) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.ctx.local_rank] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def gradient_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        return contextlib.nullcontext() if enabled else module.no_sync()


class FullySharded(Strategy):
    """FSDP2: parameters, gradients and optimizer state sharded over processes, one group
    per transformer block plus a root group (embedding, final norm, predictor)."""

    # Sharded (DTensor) parameters take the per-parameter loop.
    optimizer_implementation = "loop"

    def wrap(self, module: TrainingModule) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns that a wrapped module returns views; we never modify outputs in place.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        for layer in module.model.encoder.layers:
            fully_shard(layer)
        fully_shard(module)
        return module

    @contextlib.contextmanager
    def gradient_sync(self, module: nn.Module, enabled: bool) -> Iterator[None]:
        module.set_requires_gradient_sync(enabled)
        yield

    def full_model(self, model: Model) -> Model | None:
        """Collective: every rank takes part; the gathered copy is built on rank 0 only."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        with torch.device("meta"):
            plain = Model(model.config)
        plain.load_state_dict(state, assign=True)
        return plain

    def optimizer_state(self, model: Model, optimizer: torch.optim.Optimizer,
                        names: list[str]) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        return {f"{name}.{key}": torch.as_tensor(value).detach().cpu()
                for name, entry in state["state"].items() for key, value in entry.items()}

    def load_state(self, model: Model, optimizer: torch.optim.Optimizer, names: list[str],
                   model_state: dict[str, torch.Tensor],
                   optim_state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [n for n, p in zip(names, _group_params(optimizer))
                              if any(p is q for q in g["params"])]}
                  for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, {"state": _per_parameter(optim_state),
                                                    "param_groups": groups}, options=options)


def strategy(mode: str | None, ctx: DistContext) -> Strategy:
    """The strategy for `--parallel` `mode`: "fsdp" shards; "ddp" (or None) replicates
    under torchrun; a single process without "fsdp" is plain."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of "
                         f"{', '.join(PARALLEL_MODES)}")
    if mode == "fsdp":
        return FullySharded(ctx)
    return DataParallel(ctx) if ctx.distributed else Strategy(ctx)


def _per_parameter(optim_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{f"{param}.{key}": tensor}` as `{param: {key: tensor}}`."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in optim_state.items():
        name, _, key = flat.rpartition(".")
        per_param.setdefault(name, {})[key] = value
    return per_param


def _group_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
