"""Throughput of the data contract's array form (`iter_batches`).

    python benchmarks/bench_tokenizer.py [--mib 1024]

Prints MB/s for a cold first pass (fresh process memory) and a warm second pass over
the same random data, with the on-chain sizes (8192 x 32).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from soma_models.v1.tokenizer import iter_batches


def one_pass(data: bytes) -> float:
    start = time.perf_counter()
    positions = 0
    for batch in iter_batches(data):
        positions += batch.token_ids.size
    assert positions >= len(data)
    return len(data) / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="data size in MiB")
    args = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 256, args.mib * 2**20, dtype=np.uint8).tobytes()
    print(f"iter_batches on {args.mib} MiB: cold {one_pass(data):.0f} MB/s, "
          f"warm {one_pass(data):.0f} MB/s")


if __name__ == "__main__":
    main()
