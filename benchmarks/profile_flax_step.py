"""Where one training step's time goes, Flax against torch, op by op (issue 22, part 3).

    python benchmarks/profile_flax_step.py            # D 256, 4 layers, batch 4 x 512
    python benchmarks/profile_flax_step.py --quick    # tiny sizes (smoke run)

The step is the one `bench_flax.py --sections step` times: torch's `train_step` against
the jitted `soma_models.v1.flax.train_step` (forward, the on-chain loss, backward, global
norm clip, AdamW), same weights, batch and SIGReg noise, first losses checked equal.

1. Both steps alternate without profilers (best step of each, the ratio).
2. Steps of each run under its profiler (after one warm-up session; of `--profiles`
   steps, the one with the least kernel time is shown, as load spikes hit single steps).
   XLA:CPU: jax.profiler's perfetto trace of the compiled step's thunks, each named
   through the HLO module XLA dumps (the Python stack and JAX's op name of every
   instruction: `transpose(...)` marks the backward pass, `rematted_computation` what
   the backward recomputes, optax's frames the update).
   torch: torch.profiler's ops, the backward ones under their autograd node
   (`evaluate_function: NativeLayerNormBackward0`), the forward ones under their Python
   stack. Both are split alike into phase (forward, backward, update) x part (attention
   kernel, matmuls, LayerNorm, SIGReg, transposes and copies, other elementwise).

Profilers inflate kernel time (most for small kernels), so the table's shares and
Flax/torch ratios are what counts, and the unprofiled ratio of step 1 is the truth.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flax import (  # noqa: E402
    FULL,
    HEAVY_OPS,
    QUICK,
    _hlo_op_stacks,
    build_steps,
    time_steps,
    torch_op_events,
    xla_kernel_events,
)

PHASES = ("forward", "backward", "update")
PARTS = ("attention kernel", "matmuls (projections, PWFF, predictor)", "LayerNorm", "SIGReg",
         "transposes and copies", "other elementwise (RoPE, GELU, loss, residuals)")
OURS = f"soma_models{os.sep}v1{os.sep}"


def flax_part(frames: list[tuple[str, str]], primitive: str, op: str) -> str:
    """The part of the step an XLA thunk computes, from its Python stack `[(file,
    function)]` (innermost first), what it computes and its HLO instruction's name."""
    files = [os.path.basename(f) for f, _ in frames]
    functions = {fn for _, fn in frames}
    # `_hlo_op_stacks` names a fusion by the heavy HLO ops inside it, if any.
    heavy = all(p in HEAVY_OPS for p in primitive.split("+"))
    if not heavy and re.match(r"(copy|transpose|bitcast|.*(copy|transpose)_fusion)", op):
        return PARTS[4]
    if "attention_kernels.py" in files or functions & {"masked_attention", "causal_attention"}:
        return PARTS[0]
    if "sig_reg.py" in files:
        return PARTS[3]
    if "normalization.py" in files or any(fn.startswith("LayerNorm.") for fn in functions):
        return PARTS[2]
    if "dot" in primitive and ("linear.py" in files or "predict" in functions):
        return PARTS[1]
    return PARTS[5]


def flax_phase(frames: list[tuple[str, str]], op_name: str) -> str:
    if any(f"{os.sep}optax{os.sep}" in f for f, _ in frames):
        return "update"
    return "backward" if "transpose(" in op_name else "forward"


def profile_flax(flax_step, dump: str) -> tuple[Counter, Counter, float]:
    """One profiled Flax step: (seconds by (phase, part), seconds by kernel label, wall)."""
    import jax

    trace_dir = tempfile.mkdtemp(prefix="soma-profile-step-trace-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        flax_step()
    wall = time.perf_counter() - start
    stacks = _hlo_op_stacks(dump)
    parts: Counter = Counter()
    kernels: Counter = Counter()
    for module, op, seconds in xla_kernel_events(trace_dir):
        frames, primitive, op_name = stacks.get((module, op), ([], op, ""))
        phase = flax_phase(frames, op_name)
        part = flax_part(frames, primitive, op)
        parts[(phase, part)] += seconds
        ours = next((fn for f, fn in frames if OURS in f), "?")
        recompute = " (recomputed)" if "rematted_computation" in op_name else ""
        kind = "YNNPACK" if op.startswith("ynn_fusion") else op.split(".")[0]
        kernels[f"{phase}{recompute}: {ours} < {frames[0][1] if frames else '?'}: "
                f"{primitive} [{kind}]"] += seconds
    return parts, kernels, wall


# torch's autograd nodes and ops -> parts (the rest: other elementwise).
TORCH_NODE_PARTS = {"ScaledDotProductFlashAttentionForCpu": PARTS[0], "Addmm": PARTS[1],
                    "Mm": PARTS[1], "Bmm": PARTS[1], "NativeLayerNorm": PARTS[2],
                    "_SIGRegSum": PARTS[3], "Clone": PARTS[4], "Transpose": PARTS[4],
                    "View": PARTS[4], "Unsafe": PARTS[4]}
TORCH_OP_PARTS = {"aten::_scaled_dot_product_flash_attention_for_cpu": PARTS[0],
                  "aten::addmm": PARTS[1], "aten::mm": PARTS[1], "aten::bmm": PARTS[1],
                  "aten::native_layer_norm": PARTS[2], "aten::copy_": PARTS[4],
                  "aten::clone": PARTS[4], "aten::contiguous": PARTS[4]}


def profile_torch(torch_step) -> tuple[Counter, Counter, float]:
    """One profiled torch step: (seconds by (phase, part), seconds by op label, wall)."""
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                with_stack=True) as prof:
        torch_step()
    wall = time.perf_counter() - start
    parts: Counter = Counter()
    kernels: Counter = Counter()
    for event, frames, parents in torch_op_events(prof):
        node, phase = None, "forward"
        for name in parents:                    # innermost first: the outermost one decides
            if name.startswith("autograd::engine::evaluate_function: "):
                node, phase = name.split(": ", 1)[1], "backward"
            elif name.startswith("Optimizer."):
                phase = "update"
        if any("clip_grad" in f for f, _ in frames):
            phase = "update"
        files = [os.path.basename(f) for f, _ in frames if OURS in f]
        if phase == "backward":
            key = re.sub(r"Backward\d*$", "", node or "")
            part = TORCH_NODE_PARTS.get(key, PARTS[5])
            if event.name in ("aten::copy_", "aten::clone") and part == PARTS[5]:
                part = PARTS[4]
        elif phase == "update":
            part = PARTS[5]
        elif "sig_reg.py" in files:
            part = PARTS[3]
        elif "attention_kernels.py" in files:
            part = PARTS[0]
        else:
            part = TORCH_OP_PARTS.get(event.name, PARTS[5])
        seconds = event.self_cpu_time_total / 1e6
        parts[(phase, part)] += seconds
        ours = next((fn for f, fn in frames if OURS in f), "?")
        where = f"{node}" if phase == "backward" else ours
        kernels[f"{phase}: {where}: {event.name}"] += seconds
    return parts, kernels, wall


def print_table(flax_parts: Counter, torch_parts: Counter) -> None:
    f_total, t_total = sum(flax_parts.values()), sum(torch_parts.values())
    print(f"\n{'phase: part':<58} {'flax s':>8} {'share':>6} {'torch s':>9} {'share':>6} "
          f"{'flax/torch time':>15}")

    def row(label: str, f: float, t: float) -> None:
        ratio = f"{f / t:.2f}x" if t > 1e-4 else "-"
        # Four decimals: a quick run's update takes about half a millisecond.
        print(f"{label:<58} {f:8.4f} {100 * f / f_total:5.1f}% {t:9.4f} "
              f"{100 * t / t_total:5.1f}% {ratio:>15}")

    for phase in PHASES:
        for part in PARTS:
            f, t = flax_parts[(phase, part)], torch_parts[(phase, part)]
            if f or t:
                row(f"  {phase}: {part}", f, t)
        row(f"{phase}, all", sum(v for (p, _), v in flax_parts.items() if p == phase),
            sum(v for (p, _), v in torch_parts.items() if p == phase))
    for part in PARTS:
        row(f"all phases: {part}", sum(v for (_, p), v in flax_parts.items() if p == part),
            sum(v for (_, p), v in torch_parts.items() if p == part))
    row("step, all kernels", f_total, t_total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="unprofiled steps of each, alternated (default: 4; quick 2)")
    parser.add_argument("--profiles", type=int, default=3,
                        help="profiled steps of each; the one with the least kernel time "
                             "is shown (default 3)")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per framework")
    parser.add_argument("--one-thread", action="store_true",
                        help="both frameworks on one thread (torch.set_num_threads(1); XLA "
                             "without its Eigen thread pool): a per-core comparison that a "
                             "shared machine's load distorts far less than two threads each")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    flags = os.environ.get("XLA_FLAGS", "")
    if args.one_thread:
        flags += " --xla_cpu_multi_thread_eigen=false"
    # Before JAX starts: XLA writes the step's compiled module with every op's Python
    # stack and name, so that the profile can name each thunk.
    dump = tempfile.mkdtemp(prefix="soma-profile-step-hlo-")
    atexit.register(shutil.rmtree, dump, ignore_errors=True)
    os.environ["XLA_FLAGS"] = (flags + f" --xla_dump_to={dump}"
                               " --xla_dump_hlo_module_re=jit_train_step").strip()
    import jax
    import torch

    if args.one_thread:
        torch.set_num_threads(1)

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax "
          f"{jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    flax_step, torch_step, first, _ = build_steps(sizes)
    times = time_steps(flax_step, torch_step, args.steps or sizes["steps"])
    tokens = sizes["batch"] * sizes["seq"]
    print(f"\n== step: D {sizes['dim']}, {sizes['layers']} layers, batch {sizes['batch']} x "
          f"{sizes['seq']}, {sizes['slices']} SIGReg slices; first loss flax {first[0]:.6f} "
          f"torch {first[1]:.6f} ==")
    for name, seconds in times.items():
        print(f"{name:<6} best {min(seconds):.3f} s/step  {tokens / min(seconds):8.0f} "
              f"tokens/s  (all: {', '.join(f'{s:.3f}' for s in seconds)})")
    print(f"flax / torch tokens/s: {min(times['torch']) / min(times['flax']):.2f}x "
          f"(best step, no profiler)")

    # Each profiler's first session pays its own start-up, and a shared machine's load
    # spikes land on single steps: after one warm-up session each, keep the profiled step
    # with the least kernel time of `--profiles`, as the timing keeps the best step.
    profile_flax(flax_step, dump)
    profile_torch(torch_step)
    flax_runs, torch_runs = [], []
    for _ in range(args.profiles):
        flax_runs.append(profile_flax(flax_step, dump))
        torch_runs.append(profile_torch(torch_step))
    flax_parts, flax_kernels, flax_wall = min(flax_runs, key=lambda r: sum(r[0].values()))
    torch_parts, torch_kernels, torch_wall = min(torch_runs, key=lambda r: sum(r[0].values()))
    print(f"\n== profile: the best of {args.profiles} profiled steps each; wall flax "
          f"{flax_wall:.2f} s, torch {torch_wall:.2f} s; kernel time flax "
          f"{sum(flax_parts.values()):.2f} s, torch {sum(torch_parts.values()):.2f} s ==")
    print_table(flax_parts, torch_parts)
    recomputed = sum(v for label, v in flax_kernels.items() if "(recomputed)" in label)
    print(f"of Flax's backward: {recomputed:.3f} s recomputed forward (jax.checkpoint), "
          f"{100 * recomputed / sum(flax_parts.values()):.1f}% of the step")
    for name, kernels in (("XLA:CPU", flax_kernels), ("torch", torch_kernels)):
        total = sum(kernels.values()) or 1.0
        print(f"\n{name}: top kernels (phase: innermost function of ours < innermost "
              f"function: what [kernel])")
        for label, seconds in kernels.most_common(args.top):
            print(f"  {seconds:7.3f} s {100 * seconds / total:5.1f}%  {label}")


if __name__ == "__main__":
    main()
