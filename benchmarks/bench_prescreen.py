"""Screening with `prescreen="bf16"` against exact screening, on this machine's CPU.

    python benchmarks/bench_prescreen.py            # 48 samples of 2 KB, 3 `small` models
    python benchmarks/bench_prescreen.py --quick    # 8 samples, 3 `tiny` models (smoke run)

The targets are the exact winner embeddings of ~2% of the samples (planted hits) and one
random vector; the threshold lies midway between the planted hits and the nearest other
sample, so exact screening finds exactly the planted hits. Both screeners load the models
once; the prescreen's calibration (its first samples scored both ways, once per run) is
timed apart. Then the samples are split into groups, each timed with both paths back to
back (alternating which goes first); the ratio is of the totals, wall and this process's
CPU time. The script stops if the prescreen's hits differ from the exact ones or a kept
line differs from the exact line.

bf16 is fast only where the CPU has bf16 units (AMX, AVX512-BF16) and PyTorch's CPU
kernels use them; elsewhere the bf16 pass can be slower than float32.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
from bench_screen import clocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 samples, tiny models")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--groups", type=int, default=4, help="alternated timing groups")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--calibration-samples", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.groups, args.preset, args.calibration_samples = 8, 2, "tiny", 2

    import torch

    from soma_models.v1.configs import preset
    from soma_models.v1.screening import Screener
    from soma_models.v1.torch.modules.model import Model

    config = preset(args.preset)
    rng = np.random.default_rng(0)
    samples = [(f"sample{i:03d}", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
               for i in range(args.samples)]
    torch.manual_seed(0)
    models = [Model(config).eval() for _ in range(3)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{args.samples} samples of 2048 bytes, 3 `{args.preset}` models (D "
          f"{config.embedding_dim}, {config.num_layers} layers), protocol 0.1.7, "
          f"{args.groups} alternated groups")
    n_planted = max(1, round(0.02 * args.samples))
    planted = [int(i) for i in np.linspace(0, args.samples - 1, n_planted + 2)[1:-1]]
    first = Screener(models, np.ones(config.embedding_dim))
    targets = np.stack([r.embedding for r in first.screen([samples[i] for i in planted])] +
                       [rng.standard_normal(config.embedding_dim).astype(np.float32)])
    # The threshold from one exact pass over every sample (not timed).
    exact_results = list(Screener(models, targets).screen(samples))
    distances = sorted(r.distance for r in exact_results)
    threshold = (distances[n_planted - 1] + distances[n_planted]) / 2
    exact = Screener(models, targets, threshold=threshold)
    fast = Screener(models, targets, threshold=threshold, prescreen="bf16",
                    calibration_samples=args.calibration_samples)
    wall0, cpu0 = clocks()
    list(fast.screen(samples[:args.calibration_samples]))
    wall1, cpu1 = clocks()
    print(f"calibration on {args.calibration_samples} samples: {wall1 - wall0:.1f} s wall, "
          f"{cpu1 - cpu0:.1f} s CPU (once per run); {fast.margins}")
    totals = {"exact": [0.0, 0.0], "prescreen": [0.0, 0.0]}
    dropped = 0
    for g, members in enumerate(np.array_split(np.arange(args.samples), args.groups)):
        group = [samples[i] for i in members]
        for name in (["exact", "prescreen"] if g % 2 == 0 else ["prescreen", "exact"]):
            start = clocks()
            results = list((exact if name == "exact" else fast).screen(group))
            end = clocks()
            totals[name][0] += end[0] - start[0]
            totals[name][1] += end[1] - start[1]
            if name == "exact":
                reference = results
            else:
                screened = results
        for ours, ref in zip(screened, reference):
            if ours.hit != ref.hit or (ours.exact and ours.to_json() != ref.to_json()):
                sys.exit(f"{ours.sample}: the prescreen disagrees with exact screening")
        dropped += sum(not r.exact for r in screened)
    (ew, ec), (pw, pc) = totals["exact"], totals["prescreen"]
    print(f"{'path':<18}{'wall s':>9}{'samples/s':>11}{'CPU s':>9}")
    print(f"{'exact':<18}{ew:>9.1f}{args.samples / ew:>11.3f}{ec:>9.1f}")
    print(f"{'prescreen bf16':<18}{pw:>9.1f}{args.samples / pw:>11.3f}{pc:>9.1f}")
    print(f"prescreen / exact: {ew / pw:.2f}x samples/s (wall), {ec / pc:.2f}x (CPU time); "
          f"dropped {dropped} of {args.samples}, threshold {threshold:.4g}, hits "
          f"{n_planted} as exact, kept lines equal")


if __name__ == "__main__":
    main()
