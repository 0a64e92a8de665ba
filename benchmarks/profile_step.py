"""Operator counts of one V1 training step on the CPU (torch.profiler), by kind.

    python benchmarks/profile_step.py                 # fp32 and bf16 autocast, 2 layers
    python benchmarks/profile_step.py --layers 4 --top 25

The step is `soma_models.v1.torch.train_step.backward` (forward, the on-chain loss with
SIGReg, backward) on a small model, next to bench.py's nanoGPT-style step of the same
model (forward, plain cross-entropy, backward); the optimizer is left out (fused AdamW is one kernel
family whatever the model does). Each count is of *leaf* ATen operators: operators that
call no other ATen operator, which on a GPU is about one kernel launch each. Views
(`view`, `slice`, `transpose`, ...) and allocations launch no kernel and are not counted.
The step is profiled at `--layers` and at twice as many: the difference, per layer, is
what one encoder block launches. On a GPU the same graph runs; this is how we count its
kernels without one (an H200 kernel profile is in ../shared/measurements/).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

import torch.nn.functional as F
from bench import NanoGPTStep
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg
from soma_models.v1.torch.train_step import backward

# Operators that only reshape, alias or allocate: no kernel on a GPU.
NO_KERNEL = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::slice",
    "aten::select", "aten::transpose", "aten::t", "aten::permute", "aten::expand",
    "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::detach_", "aten::alias",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::split",
    "aten::unbind", "aten::narrow", "aten::_unsafe_view", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::unflatten",
    "aten::flatten", "aten::contiguous", "aten::chunk", "aten::split_with_sizes",
    "aten::view_as", "aten::numpy_T", "aten::_has_compatible_shallow_copy_type",
    "aten::to", "aten::dropout",  # leaves only when they return their input as it is
})
# Kinds reported on their own line (the ones the H200 profile singles out).
KINDS = {
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy"),
    "fills": ("aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::ones",
              "aten::new_zeros", "aten::full"),
    "elementwise mul/add/sub/neg/div": ("aten::mul", "aten::add", "aten::sub", "aten::neg",
                                        "aten::div", "aten::mul_", "aten::add_", "aten::rsub"),
    "cat/roll": ("aten::cat", "aten::roll"),
}


def leaf_ops(prof) -> Counter:
    """Counts of leaf ATen operators (no ATen operator below them) that launch work."""
    def launches(event) -> bool:
        return event.name.startswith("aten::") and event.name not in NO_KERNEL

    def has_launching_descendant(event) -> bool:
        return any(launches(child) or has_launching_descendant(child)
                   for child in event.cpu_children)

    return Counter(event.name for event in prof.events()
                   if launches(event) and not has_launching_descendant(event))


def profile_step(config: ModelConfig, batch: int, seq: int, slices: int, bf16: bool,
                 path: str) -> Counter:
    """Leaf operator counts of one forward + loss + backward of `path`: "ours" (the
    library's step) or "nanoGPT" (bench.py's `NanoGPTStep` forward, plain cross-entropy)."""
    torch.manual_seed(0)
    model = Model(config).train()
    sig_reg = SIGReg(SIGRegConfig(slices=slices))
    tokens = torch.randint(0, 256, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    pos_ids = torch.arange(seq).expand(batch, seq)
    noise = torch.randn(config.embedding_dim, slices)
    if path == "ours":
        def run() -> None:
            backward(model, sig_reg, inputs, targets, pos_ids, noise=noise, autocast_bf16=bf16)
    else:
        nano = NanoGPTStep(model)

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = nano.forward(inputs, pos_ids)
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                            ignore_index=256).backward()
    run()                                               # warm-up (lazy init, caches)
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return leaf_ops(prof)


def report(counts: Counter, doubled: Counter, layers: int, top: int) -> None:
    """`counts` at `layers` layers, `doubled` at twice as many: their difference over
    `layers` is what one block costs, apart from the embedding, loss and SIGReg."""
    per_layer = Counter({name: (doubled[name] - counts[name]) / layers
                         for name in doubled if doubled[name] != counts[name]})
    total = sum(counts.values())
    print(f"leaf operators (~GPU kernels) per step: {total}; per block: "
          f"{sum(per_layer.values()):.0f}")
    print(f"  {'kind':<34}{'step':>6}{'block':>7}")
    for kind, names in KINDS.items():
        n, b = sum(counts[x] for x in names), sum(per_layer[x] for x in names)
        print(f"  {kind:<34}{n:>6}{b:>7.0f}")
    print(f"  top {top} per block:")
    for name, n in per_layer.most_common(top):
        print(f"    {name:<40}{n:>6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    config = ModelConfig(embedding_dim=args.dim, num_heads=4, pwff_hidden_dim=4 * args.dim,
                         num_layers=args.layers)
    doubled = replace(config, num_layers=2 * args.layers)
    print(f"torch {torch.__version__}, CPU; D {args.dim}, {args.layers} layers, batch "
          f"{args.batch} x {args.seq}, {args.slices} SIGReg slices; one step's forward + loss "
          f"+ backward")
    for bf16 in (False, True):
        for path in ("ours", "nanoGPT"):
            print(f"\n== {path}, {'bf16 autocast' if bf16 else 'float32'} ==")
            counts = [profile_step(c, args.batch, args.seq, args.slices, bf16, path)
                      for c in (config, doubled)]
            report(*counts, args.layers, args.top)


if __name__ == "__main__":
    main()
