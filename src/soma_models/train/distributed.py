"""Past one machine: process groups, DDP and FSDP2 wrapping, full-state gathering.

Launch with `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without
those variables everything here degrades to a single process. The backend is NCCL when
CUDA is available and gloo otherwise (CPU).

* ``ddp``: every process holds the whole model; gradients are all-reduced (averaged).
* ``fsdp``: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters,
  gradients and optimizer state across processes, one group per transformer block plus
  a root group (embedding, final norm, predictor). For models that do not fit one device.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from soma_models.v1.torch.modules import Model

PARALLEL_MODES = ("ddp", "fsdp")


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


def wrap(module: TrainingModule, mode: str | None, ctx: DistContext) -> nn.Module:
    """Wrap for data-parallel training. `mode` None (or a single process) leaves it as is."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of "
                         f"{', '.join(PARALLEL_MODES)}")
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns that a wrapped module returns views; we never modify outputs in place.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        for layer in module.model.encoder.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    if ctx.distributed and mode in (None, "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    return module


def unwrap(wrapped: nn.Module) -> TrainingModule:
    return getattr(wrapped, "module", wrapped)


def full_model_state(wrapped: nn.Module, mode: str | None) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU, keyed like `Model.state_dict()`.

    Collective under FSDP (call on every rank); the result is on rank 0 only (None elsewhere).
    """
    inner = unwrap(wrapped)
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return state if (not dist.is_initialized() or dist.get_rank() == 0) else None
    return {k: v.detach().cpu() for k, v in inner.model.state_dict().items()}


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                         mode: str | None, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Optimizer moments as `{f"{param}.{key}": tensor}` on CPU (rank 0; collective under FSDP).

    `names` are the parameter names in optimizer order (for the non-FSDP path).
    """
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(unwrap(wrapped).model, optimizer,
                                         options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {f"{name}.{key}": torch.as_tensor(value).detach().cpu()
                for name, entry in state["state"].items() for key, value in entry.items()}
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params, strict=True):
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu()
    return out


def load_full_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, mode: str | None,
                    names: list[str], model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, torch.Tensor]) -> None:
    """Put full (unsharded) model and optimizer state back (every rank passes the same)."""
    inner = unwrap(wrapped)
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in optim_state.items():
        name, _, key = flat.rpartition(".")
        per_param.setdefault(name, {})[key] = value
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(inner.model, model_state, options=options)
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [n for n, p in zip(names, _group_params(optimizer))
                              if any(p is q for q in g["params"])]}
                  for g in optimizer.param_groups]
        set_optimizer_state_dict(inner.model, optimizer,
                                 {"state": per_param, "param_groups": groups}, options=options)
        return
    with torch.no_grad():
        own = inner.model.state_dict()
        for key, tensor in model_state.items():
            own[key].copy_(tensor)
    params = _group_params(optimizer)
    state = {i: per_param[name] for i, name in enumerate(names) if name in per_param}
    groups = []
    index = 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(index, index + count))})
        index += count
    assert index == len(params)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _group_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
