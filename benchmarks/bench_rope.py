"""RoPE's rotation, forward + backward: the library's `rotate` against the half-split
formula written out (float32 tables cast to the input's dtype on every call, halves
sliced, rotated and concatenated: what the library did before issue 20), alternated in
one process, at the size of one layer's q of the benchmark's train config.

    python benchmarks/bench_rope.py              # batch 8, seq 1024, 8 heads of 64
    python benchmarks/bench_rope.py --repeats 20

Both compute the same numbers (checked before timing: bit for bit in float32).
"""

from __future__ import annotations

import argparse
import time

import torch

from soma_models.v1.rope import rope_timescales
from soma_models.v1.torch.modules.attention import rope_tables, rotate


def half_split_tables(pos_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    """float32 sin, cos `[B, S, 1, hd/2]`."""
    timescale = torch.from_numpy(rope_timescales(head_dim, 10_000.0).copy())
    angle = pos_ids.to(torch.float32)[:, :, None] / timescale
    return torch.sin(angle)[:, :, None, :], torch.cos(angle)[:, :, None, :]


def half_split_rotate(x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    sin, cos = (t.to(x.dtype) for t in tables)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    pos_ids = torch.arange(args.seq).expand(args.batch, args.seq)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; x {list(shape)}, "
          f"forward + backward, {args.repeats} alternated repeats, mean of the best half")
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
        grad = torch.randn(shape, generator=generator).to(dtype)
        old_tables = half_split_tables(pos_ids, args.head_dim)
        new_tables = rope_tables(pos_ids, args.head_dim, 10_000.0, dtype=dtype)
        paths = {"half-split": lambda: half_split_rotate(x, old_tables),
                 "rotate": lambda: rotate(x, new_tables)}
        if dtype == torch.float32:
            with torch.no_grad():
                if not torch.equal(paths["half-split"](), paths["rotate"]()):
                    raise SystemExit("rotate differs from the half-split formula")
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, run in paths.items():
                start = time.perf_counter()
                run().backward(grad)
                seconds[name].append(time.perf_counter() - start)
                x.grad = None
        best = {name: sorted(s)[: max(1, len(s) // 2)] for name, s in seconds.items()}
        mean = {name: sum(s) / len(s) for name, s in best.items()}
        print(f"{str(dtype):<16} half-split {1e3 * mean['half-split']:8.2f} ms   rotate "
              f"{1e3 * mean['rotate']:8.2f} ms   rotate / half-split "
              f"{mean['rotate'] / mean['half-split']:.2f}x")


if __name__ == "__main__":
    main()
