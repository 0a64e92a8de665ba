"""Training memory of V1 at the network's batch, with and without activation checkpointing,
estimated on the CPU from the tensors the training forward keeps for the backward pass.

    python benchmarks/memory_estimate.py            # full V1 (24 x 2048, 8192), 16 x 1024
    python benchmarks/memory_estimate.py --quick    # the `tiny` preset (tests)

Why an estimate and how (no GPU needed):
* The forward does not run on the `meta` device (RoPE asks autocast about the device),
  so it runs on real CPU tensors, under bfloat16 autocast as `soma-models train
  --bf16` runs it on a GPU (under CPU autocast the attention takes the same SDPA path as
  on CUDA; the CPU SDPA keeps output + log-sum-exp, as the GPU flash kernel does).
* What is measured is the step `train_step.backward` runs up to its `.backward()`:
  the training forward (`train_step.forward`, a 2-block model at full width) and the
  on-chain loss (`loss.loss_terms`, cross-entropy + SIGReg with the revision's slices).
* "held" = every tensor storage created by that forward + loss and still alive when the
  backward would start (a TorchDispatchMode records each new storage with the block that
  made it; weak references tell which are alive), so nothing kept outside autograd's
  saved tensors is missed. "saved" is the sum of the unique storages that
  `saved_tensors_hooks` sees packed, as a cross-check (with checkpointing it sees each
  block's input, which the checkpoint saves; the block's inner tensors are its own).
* Everything the forward keeps is linear in the number of tokens (the attention is the
  linear-memory fused kernel) plus constants (autocast's bf16 copies of the weights), so
  each figure is measured at two sequence lengths and extrapolated to batch x seq tokens
  with a straight line: per block from block 2, the rest (embedding, head, loss) once.
* Parameters, gradients and AdamW state are float32: 4 + 4 + 8 bytes per parameter.
  The total adds all of it to all the activations, which over-counts a little: the
  trainer sets gradients to None between steps, so they fill in during the backward as
  the activations are freed.

Not included (comes on top of a real GPU peak): the backward's transient buffers (one
block's recomputed activations with checkpointing, each block's gradient temporaries),
the allocator's caching and fragmentation, cuBLAS/cuDNN workspaces, the CUDA context.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from soma_models.v1.configs import SIGRegConfig, preset
from soma_models.v1.torch.loss import loss_terms
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg
from soma_models.v1.torch.train_step import forward, prepare_model

REST = -1                                       # tag: created outside the encoder blocks


class StorageTracker(TorchDispatchMode):
    """Records every storage an operator creates (not views of existing ones), tagged
    with the block running at the time (`block`, set by forward pre-hooks)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.known = {StorageWeakRef(t.untyped_storage()) for t in existing}
        self.created: dict[StorageWeakRef, tuple[int, int]] = {}   # ref: (nbytes, block)
        self.block = REST

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.known:
                    self.known.add(ref)
                    self.created[ref] = (t.untyped_storage().nbytes(), self.block)
        return out

    def alive_bytes(self) -> dict[int, int]:
        """Bytes per tag of the created storages still alive."""
        totals: dict[int, int] = {}
        for ref, (nbytes, block) in self.created.items():
            if not ref.expired():
                totals[block] = totals.get(block, 0) + nbytes
        return totals


def measure(model: Model, sig_reg: SIGReg, batch: int, seq: int, checkpointing: bool,
            bf16: bool) -> tuple[dict[int, int], dict[int, int]]:
    """(held, saved-tensor) bytes per tag of one training forward + on-chain loss."""
    prepare_model(model, activation_checkpointing=checkpointing)
    model.train()
    gen = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    pos_ids = torch.arange(seq).expand(batch, seq).contiguous()
    noise = torch.randn(model.config.embedding_dim, sig_reg.config.slices, generator=gen)
    existing = [*model.parameters(), *model.buffers(), token_ids, targets, pos_ids, noise]
    tracker = StorageTracker(existing)
    saved: dict[StorageWeakRef, tuple[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in tracker.created:        # not a parameter or an input
            saved[ref] = tracker.created[ref]
        return t

    def enter(index: int):
        def hook(module, args, kwargs=None):
            tracker.block = index
        return hook

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in
               enumerate(model.encoder.layers)]
    handles += [layer.register_forward_hook(lambda *a: setattr(tracker, "block", REST))
                for layer in model.encoder.layers]
    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # What train_step.backward runs before its .backward().
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                representations, logits = forward(model, token_ids, pos_ids)
            terms = loss_terms(representations, logits, targets, sig_reg, noise)
        held = tracker.alive_bytes()
        del terms, representations, logits
    finally:
        for handle in handles:
            handle.remove()
    saved_bytes: dict[int, int] = {}
    for nbytes, block in saved.values():
        saved_bytes[block] = saved_bytes.get(block, 0) + nbytes
    return held, saved_bytes


def block_bytes(by_tag: dict[int, int]) -> int:
    """The second block's bytes (the first may hold what all blocks share)."""
    return by_tag.get(1, 0)


def rest_bytes(by_tag: dict[int, int]) -> int:
    """Bytes made outside the blocks (embedding, RoPE tables, head, loss)."""
    return by_tag.get(REST, 0)


def extrapolate(small: float, large: float, tokens_small: int, tokens_large: int,
                tokens: int) -> float:
    """The straight line through two measurements, at `tokens`."""
    slope = (large - small) / (tokens_large - tokens_small)
    return small + slope * (tokens - tokens_small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the `tiny` preset at batch 2 x 64 (tests)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--measure-seqs", type=int, nargs=2, default=(128, 256),
                        help="the two sequence lengths (batch 1) measured on the CPU")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args = parser.parse_args()
    config = preset("v1")
    if args.quick:
        config, args.batch, args.seq, args.measure_seqs = preset("tiny"), 2, 64, (16, 32)
    bf16 = not args.fp32
    unit, scale = ("MB", 1e6) if args.quick else ("GB", 1e9)
    layers = config.num_layers
    sig_config = SIGRegConfig.for_protocol()
    torch.manual_seed(0)
    probe = Model(replace(config, num_layers=2))     # block 2 is one block's figure
    full_params = sum(p.numel() for p in probe.parameters()) + (layers - 2) * sum(
        p.numel() for p in probe.encoder.layers[0].parameters())
    sig_reg = SIGReg(sig_config)
    tokens = args.batch * args.seq
    print(f"torch {torch.__version__}; V1 D {config.embedding_dim}, hidden "
          f"{config.pwff_hidden_dim}, {layers} layers, vocab {config.vocab_size}; "
          f"{full_params:,} parameters; batch {args.batch} x {args.seq}, "
          f"{sig_config.slices} SIGReg slices; {'bf16 autocast' if bf16 else 'float32'} "
          f"on the CPU; measured at 1 x {args.measure_seqs[0]} and 1 x {args.measure_seqs[1]}"
          f" with a 2-block model, extrapolated to {tokens} tokens and {layers} blocks")
    state_gb = full_params * (4 + 4 + 8) / scale
    print(f"figures in {unit} (1 {unit} = {scale:g} bytes)")
    print(f"{'':24}{'per block':>10}{'blocks':>9}{'rest':>8}{'acts':>8}"
          f"{'params+grads+Adam':>19}{'total':>8}{'saved (hooks)':>15}   fits {args.gpu_gb:g} GB")
    gpu = args.gpu_gb * 1e9 / scale
    totals = {}
    for checkpointing in (False, True):
        runs = [measure(probe, sig_reg, 1, s, checkpointing, bf16) for s in args.measure_seqs]
        held_block, held_rest, saved_block, saved_rest = (
            extrapolate(*[part(run[which]) for run in runs], *args.measure_seqs, tokens) / scale
            for which in (0, 1) for part in (block_bytes, rest_bytes))
        per_block, rest_gb = held_block, held_rest
        acts = rest_gb + layers * per_block
        total = acts + state_gb
        saved_gb = saved_rest + layers * saved_block
        totals[checkpointing] = total
        name = "with checkpointing" if checkpointing else "without checkpointing"
        print(f"{name:24}{per_block:10.3f}{layers * per_block:9.2f}{rest_gb:8.2f}{acts:8.2f}"
              f"{state_gb:19.2f}{total:8.2f}{saved_gb:15.2f}   "
              f"{'yes' if total < gpu else 'NO'}")
        if not per_block > 0 or not total > 0:
            raise SystemExit(f"non-positive estimate: per block {per_block}, total {total}")
    print(f"with / without checkpointing total: "
          f"{totals[True] / totals[False]:.3f}x. Estimate from the tensors held for the "
          f"backward, not a measured GPU peak (see the docstring for what comes on top).")


if __name__ == "__main__":
    main()
