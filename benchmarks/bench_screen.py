"""Screening throughput: `Screener.screen` against a loop of `compete`, one sample at a time.

    python benchmarks/bench_screen.py              # 96 samples of 0.5-4 KB, 3 `small` models
    python benchmarks/bench_screen.py --quick      # 6 samples, 3 `tiny` models (smoke run)

Both paths score the same samples with the same models (written to a temporary folder,
as a user's would be) under the 0.1.7 contract (rows of 1024, batches of 16, 256 SIGReg
slices), seed 0, one target. The loop calls `compete(paths, sample, 0, target=...)` per
sample, which is what a submitter has without screening: it loads every model and draws
the noise on each call. `screen` loads the models once (its load time is counted) and
packs rows of many samples into each forward pass.

To stay fair on a shared machine the samples are split into groups, and each group is
timed with both paths back to back (alternating which goes first); the ratio is of the
totals. Wall time and this process's CPU time are both reported: CPU time is less
disturbed by other jobs. The script stops if any loss differs by more than rtol 1e-6 or
a winner differs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench import EvalCase, eval_flops, matmul_gflops


def clocks() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 samples, tiny models")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--groups", type=int, default=8, help="alternated timing groups")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--micro-batch-size", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.groups, args.preset = 6, 2, "tiny"

    import torch

    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights
    from soma_models.v1.scoring import compete
    from soma_models.v1.screening import Screener

    if args.threads:
        torch.set_num_threads(args.threads)
    micro = args.micro_batch_size if args.micro_batch_size == "auto" else \
        int(args.micro_batch_size)
    config = preset(args.preset)
    rng = np.random.default_rng(0)
    sizes = rng.integers(512, 4096, args.samples, endpoint=True)
    samples = [(f"sample{i:03d}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
               for i, n in enumerate(sizes)]
    target = rng.standard_normal(config.embedding_dim).astype(np.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{args.samples} samples of {sizes.min()}-{sizes.max()} bytes "
          f"({sizes.sum() / 1024:.0f} KiB), 3 `{args.preset}` models (D {config.embedding_dim}, "
          f"{config.num_layers} layers), protocol 0.1.7 (rows 1024, batches 16, 256 slices), "
          f"micro-batch {args.micro_batch_size}, {args.groups} alternated groups")
    with tempfile.TemporaryDirectory() as folder:
        paths = [str(Path(folder) / f"m{i}.safetensors") for i in range(3)]
        for i, path in enumerate(paths):
            write_initial_weights(path, config, seed=i)
        # Warm up both paths (imports, allocator) on one sample, outside the timing.
        compete(paths, samples[0][1], 0, target=target)
        Screener(paths, target, micro_batch_size=micro)
        totals = {"loop": [0.0, 0.0], "screen": [0.0, 0.0]}
        groups = np.array_split(np.arange(args.samples), args.groups)
        for g, members in enumerate(groups):
            group = [samples[i] for i in members]
            order = ["loop", "screen"] if g % 2 == 0 else ["screen", "loop"]
            for path_name in order:
                wall0, cpu0 = clocks()
                if path_name == "loop":
                    looped = [compete(paths, data, 0, target=target) for _, data in group]
                else:
                    screener = Screener(paths, target, micro_batch_size=micro)
                    screened = list(screener.screen(group))
                wall1, cpu1 = clocks()
                totals[path_name][0] += wall1 - wall0
                totals[path_name][1] += cpu1 - cpu0
            for c, s in zip(looped, screened):
                np.testing.assert_allclose(s.losses, c.losses, rtol=1e-6, atol=0)
                if s.winner != c.winner or abs(s.distances[0] - c.distance) > 1e-5:
                    sys.exit(f"{s.sample}: screen and compete disagree")
            done = sum(len(m) for m in groups[:g + 1])
            loop, scr = totals["loop"], totals["screen"]
            print(f"  after group {g + 1}/{args.groups} ({done} samples, load average "
                  f"{os.getloadavg()[0]:.1f}): loop {loop[0]:.1f} s wall / {loop[1]:.1f} s CPU, "
                  f"screen {scr[0]:.1f} s / {scr[1]:.1f} s: {loop[0] / scr[0]:.2f}x wall, "
                  f"{loop[1] / scr[1]:.2f}x CPU", flush=True)
    print(f"{'path':<18}{'wall s':>9}{'samples/s':>11}{'CPU s':>9}")
    for name, (wall, cpu) in totals.items():
        label = "compete per sample" if name == "loop" else "screen"
        print(f"{label:<18}{wall:>9.1f}{args.samples / wall:>11.3f}{cpu:>9.1f}")
    loop, scr = totals["loop"], totals["screen"]
    print(f"screen / compete loop: {loop[0] / scr[0]:.2f}x samples/s (wall), "
          f"{loop[1] / scr[1]:.2f}x (CPU time); losses and winners agree")
    # The ceiling of any exact speed-up: every sample's rows must go through every model,
    # so even a forward pass running entirely at the machine's matmul rate needs this long.
    rows = int(sum(-(-int(n) // 1024) for n in sizes))
    one_row = EvalCase(dim=config.embedding_dim, heads=config.num_heads,
                       hidden=config.pwff_hidden_dim, layers=config.num_layers,
                       vocab=config.vocab_size, batch=1, seq=1024, slices=256, path="ours")
    gflop = 3 * rows * eval_flops(one_row) / 1e9   # a lower bound: no cos/sin, no element-wise
    rate = matmul_gflops(2048)
    floor = gflop / rate
    print(f"compute floor: {rows} rows x 3 models = {gflop / 1e3:.2f} TFLOP of forward "
          f"passes; at this process's 2048^3 matmul rate ({rate:.0f} GFLOP/s) that is "
          f"{floor:.1f} s, so no exact screening can beat the loop by more than "
          f"{loop[0] / floor:.2f}x here (screen reached {gflop / scr[0]:.0f} GFLOP/s, "
          f"{gflop / scr[0] / rate:.0%} of the matmul rate)")


if __name__ == "__main__":
    main()
