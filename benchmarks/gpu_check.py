"""One-shot GPU check: exactness on CUDA, screening throughput, and a bf16 training step.

    python benchmarks/gpu_check.py            # on a CUDA machine: under 10 minutes on one H100
    python benchmarks/gpu_check.py --quick    # tiny sizes on whatever device there is (CI, CPU)

(a) CUDA vs CPU scoring deviation: the same weights and data scored with `score` on the
    CPU and on CUDA (float32, TF32 off: the scoring path's `strict_float32`), for a
    `small` model and for one full-width V1 layer (D 2048, hidden 8192) on a full
    16 x 1024 batch (0.1.7's contract). Reports |loss difference| (absolute and relative)
    and the largest embedding difference, against SPEC §9's rtol/atol 1e-5.
(b) Screening throughput of the 24-layer V1: 3 random models, 2 KB samples, samples/s of
    `Screener.screen` (models already on the device; float32, TF32 off). The targets are
    the winner embeddings of 2% of the samples and one random vector; the threshold lies
    between those planted hits and the nearest other sample. Then the same screening with
    `prescreen="bf16"` (bf16 first pass, exact re-scoring of what it cannot prove a miss):
    samples/s as a ratio to exact, how many it dropped, whether its hits are exactly the
    exact ones, and the calibration (time, margins, largest deviations) apart.
(c) One bf16-autocast training step of the 24-layer V1 (`train_step.backward`, what
    `soma-models train` runs: forward, on-chain loss with SIGReg, backward; fused AdamW)
    against a nanoGPT-style step of the same dimensions written here (learned positions,
    SDPA causal attention, plain cross-entropy, no SIGReg), in tokens/s and MFU (model
    FLOPs 6N + 12 L D S per token, over the device's dense bf16 peak; `--peak-tflops` to
    set it). Rows: ours eager and with `--compile` (each block torch.compile'd), the
    nanoGPT-style anchor (eager), all at 8 rows of 1024; then the network's batch of
    16 x 1024 eager, with activation checkpointing (peak memory with and without: does
    it fit an 80 GB GPU?) and with `--compile`. The first step's time is shown apart:
    for compiled rows it includes the compile time.

Every section has Flax rows too (benchmarks/gpu_check_flax.py; JAX on its default
backend): (a) Flax on JAX's device against Flax on JAX's CPU and against torch on the
CPU, which shows that `Precision.HIGHEST` holds on CUDA; (b) the same screening with the
Flax backend; (c) the Flax bf16 step of `soma-models train --framework flax --bf16`.

Without CUDA the script still runs every section, on the CPU against the CPU (the
deviation is then 0 by construction and says nothing about GPUs); `--quick` shrinks all
sizes so that this takes well under a minute (and compiles with the aot_eager backend,
which captures the same graphs without generating code). Random weights are spread (not the small
init), so every term of the loss matters in (a).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

# JAX (the Flax rows) allocates GPU memory as it needs it, beside torch's allocator.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import gpu_check_flax as fx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from soma_models.v1.configs import ModelConfig, SIGRegConfig, preset  # noqa: E402
from soma_models.v1.revisions import resolve  # noqa: E402
from soma_models.v1.scoring import score  # noqa: E402
from soma_models.v1.screening import Screener  # noqa: E402
from soma_models.v1.torch import serde  # noqa: E402
from soma_models.v1.torch.modules.model import Model  # noqa: E402
from soma_models.v1.torch.modules.sig_reg import SIGReg  # noqa: E402
from soma_models.v1.torch.train_step import backward, prepare_model  # noqa: E402

# Dense bf16 peak (no sparsity), TFLOP/s, by device-name fragment; first match wins.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L4", 121.0))
SPEC_RTOL = SPEC_ATOL = 1e-5


@dataclass(frozen=True)
class Sizes:
    small: ModelConfig          # (a) the small model
    layer: ModelConfig          # (a) one full-width layer
    seq_len: int                # the contract's rows ...
    batch_size: int             # ... and rows per batch
    slices: int
    v1: ModelConfig             # (b), (c)
    samples: int                # (b) samples screened after one warm-up pass
    sample_bytes: int
    train_batch: int            # (c) rows per step
    train_steps: int


def sizes_for(quick: bool) -> Sizes:
    revision = resolve("0.1.7")
    if quick:
        narrow = ModelConfig(embedding_dim=32, num_heads=4, pwff_hidden_dim=64, num_layers=2)
        return Sizes(small=preset("tiny"), layer=replace(narrow, num_layers=1), seq_len=32,
                     batch_size=4, slices=16, v1=narrow, samples=4, sample_bytes=100,
                     train_batch=2, train_steps=1)
    return Sizes(small=preset("small"), layer=ModelConfig(num_layers=1),
                 seq_len=revision.max_seq_len, batch_size=revision.batch_size,
                 slices=revision.sig_reg_slices, v1=ModelConfig.for_protocol("0.1.7"),
                 samples=96, sample_bytes=2048, train_batch=8, train_steps=5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def spread_(model: nn.Module, seed: int) -> nn.Module:
    """Weights with enough spread that every term of the loss matters (in place)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        if p.ndim == 2:
            fan_in = p.shape[0] if name.startswith("embedding") else p.shape[1]
            p.copy_(noise * (1.5 / math.sqrt(fan_in)))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def random_model(config: ModelConfig, seed: int, device: torch.device) -> Model:
    with torch.device(device):
        return spread_(Model(config), seed).eval()


# --------------------------------------------------------------------------- (a)

def section_deviation(sizes: Sizes, device: torch.device) -> None:
    print(f"\n== (a) {device.type} vs cpu scoring deviation (float32, TF32 off) ==")
    rows = sizes.seq_len * sizes.batch_size
    sig_reg = SIGRegConfig(slices=sizes.slices)
    data = np.random.default_rng(1).integers(0, 256, rows, dtype=np.uint8).tobytes()
    print(f"one full batch: {sizes.batch_size} x {sizes.seq_len}, {sizes.slices} SIGReg slices, "
          f"seed 0; SPEC §9 tolerance rtol {SPEC_RTOL:g}, atol {SPEC_ATOL:g}")
    print(f"{'model':<34}{'cpu loss':>13}{'device loss':>13}{'|d loss|':>10}{'rel':>10}"
          f"{'max|d emb|':>12}{'cpu s':>7}{'dev s':>7}  ok")
    layer_label = "one layer" if sizes.layer.embedding_dim < 2048 else "one full-width layer"
    flax_rows = []
    for label, config in (("small", sizes.small), (layer_label, sizes.layer)):
        arrays = serde.canonical_arrays(random_model(config, 7, torch.device("cpu")))
        results = []
        for dev in ("cpu", device.type):
            start = time.perf_counter()
            result = score(arrays, data, 0, model_config=config, sig_reg_config=sig_reg,
                           max_seq_len=sizes.seq_len, batch_size=sizes.batch_size, device=dev)
            sync(device)
            results.append((result, time.perf_counter() - start))
        (cpu, cpu_s), (dev, dev_s) = results
        name = f"{label} (D {config.embedding_dim}, {config.num_layers} layer(s))"
        print_deviation(name, cpu, dev, cpu_s, dev_s)
        (jax_cpu, jax_cpu_s), (jax_dev, jax_dev_s) = fx.score_both(
            arrays, data, config, sig_reg, sizes.seq_len, sizes.batch_size)
        flax_rows.append((f"flax {name}", jax_cpu, jax_dev, jax_cpu_s, jax_dev_s))
        flax_rows.append((f"flax vs torch cpu, {label}", cpu, jax_dev, cpu_s, jax_dev_s))
        del arrays
        gc.collect()
    print(f"Flax (JAX on {fx.backend()}): JAX's device against JAX's CPU, and against torch "
          f"on the CPU (Precision.HIGHEST: every matmul true float32)")
    for row in flax_rows:
        print_deviation(*row)


def print_deviation(name: str, cpu: object, dev: object, cpu_s: float, dev_s: float) -> None:
    """One row of (a): two scores of the same weights and data, and whether they agree
    within SPEC §9's tolerance."""
    diff = abs(cpu.loss - dev.loss)
    emb = float(np.max(np.abs(cpu.embedding - dev.embedding)))
    ok = diff <= SPEC_ATOL + SPEC_RTOL * abs(cpu.loss) and np.allclose(
        dev.embedding, cpu.embedding, rtol=SPEC_RTOL, atol=SPEC_ATOL)
    print(f"{name:<34}{cpu.loss:>13.7f}{dev.loss:>13.7f}{diff:>10.2e}"
          f"{diff / abs(cpu.loss):>10.2e}{emb:>12.2e}{cpu_s:>7.1f}{dev_s:>7.1f}  "
          f"{'yes' if ok else 'NO'}")


# --------------------------------------------------------------------------- (b)

def section_screening(sizes: Sizes, device: torch.device) -> None:
    config = sizes.v1
    print(f"\n== (b) screening throughput on {device.type}: {config.num_layers}-layer "
          f"(D {config.embedding_dim}) x 3 random models, {sizes.sample_bytes}-byte samples ==")
    models = [random_model(config, seed, device) for seed in (1, 2, 3)]
    rng = np.random.default_rng(2)
    samples = [(f"s{i}", rng.integers(0, 256, sizes.sample_bytes, dtype=np.uint8).tobytes())
               for i in range(sizes.samples)]
    contract = {"max_seq_len": sizes.seq_len, "batch_size": sizes.batch_size,
                "sig_reg_config": SIGRegConfig(slices=sizes.slices), "micro_batch_size": "auto"}
    # Targets: the exact winner embeddings of ~2% of the samples (planted hits) and one
    # random vector, as a submitter screening for a target's neighbourhood would meet.
    n_planted = max(1, round(0.02 * len(samples)))
    planted = [int(i) for i in np.linspace(0, len(samples) - 1, n_planted + 2)[1:-1]]
    first = Screener(models, np.ones(config.embedding_dim), **contract)
    targets = np.stack([r.embedding for r in first.screen([samples[i] for i in planted])] +
                       [rng.standard_normal(config.embedding_dim).astype(np.float32)])
    screener = Screener(models, targets, **contract)
    rows = -(-sizes.sample_bytes // sizes.seq_len)
    # Warm-up on a quarter of the samples, at most one full pass (allocator, kernels).
    warm = max(1, min(len(samples) // 4, screener.rows_per_pass // rows))
    list(screener.screen(samples[:warm]))
    sync(device)
    start = time.perf_counter()
    results = list(screener.screen(samples))
    sync(device)
    seconds = time.perf_counter() - start
    peak = (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda" else "")
    print(f"{len(results)} samples ({rows} rows of {sizes.seq_len} each) in {seconds:.1f} s: "
          f"{len(results) / seconds:.2f} samples/s; {screener.rows_per_pass} rows per pass{peak}")
    # The threshold: midway between the planted hits' distances and the nearest other one.
    distances = sorted(r.distance for r in results)
    threshold = (distances[len(planted) - 1] + distances[len(planted)]) / 2
    exact_hits = [r.sample for r in results if r.distance < threshold]
    section_prescreen(models, samples, targets, threshold, exact_hits, seconds, contract,
                      device)
    # The same weights, samples and targets through the Flax backend (JAX's device).
    arrays = [serde.canonical_arrays(m) for m in models]
    del models, screener
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flax = Screener(arrays, targets, model_config=config, framework="flax", **contract)
    list(flax.screen(samples[:warm]))
    start = time.perf_counter()
    flax_results = list(flax.screen(samples))
    flax_seconds = time.perf_counter() - start
    memory = fx.peak_gib()
    losses = np.array([r.losses for r in results])
    rel = float(np.max(np.abs(np.array([r.losses for r in flax_results]) - losses)
                       / np.abs(losses)))
    print(f"flax ({fx.backend()}): {len(flax_results) / flax_seconds:.2f} samples/s; "
          f"{flax.rows_per_pass} rows per pass"
          + (f", peak memory {memory:.1f} GiB" if memory is not None else ""))
    print(f"flax / torch samples/s: {seconds / flax_seconds:.2f}x; largest relative loss "
          f"difference flax vs torch {rel:.1e}")


def section_prescreen(models: list[Model], samples: list[tuple[str, bytes]],
                      targets: np.ndarray, threshold: float, exact_hits: list[str],
                      exact_seconds: float, contract: dict, device: torch.device) -> None:
    """The same screening with `prescreen="bf16"`: calibration first (the first
    `calibration` samples scored both ways, timed apart: once per run), then every sample
    timed against the exact rate; the hits must be the exact ones."""
    calibration = min(32, max(1, len(samples) // 3))
    screener = Screener(models, targets, threshold=threshold, prescreen="bf16",
                        calibration_samples=calibration, **contract)
    start = time.perf_counter()
    list(screener.screen(samples[:calibration]))        # calibrates, and warms bf16 up
    sync(device)
    calibration_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results = list(screener.screen(samples))
    sync(device)
    seconds = time.perf_counter() - start
    hits = [r.sample for r in results if r.hit]
    dropped = sum(not r.exact for r in results)
    print(f"prescreen bf16, threshold {threshold:.4g} ({len(exact_hits)} exact hits): "
          f"{len(results) / seconds:.2f} samples/s, {exact_seconds / seconds:.2f}x exact; "
          f"dropped {dropped}, re-scored {len(results) - dropped} exactly; same hits as "
          f"exact: {'yes' if hits == exact_hits else 'NO'}")
    print(f"  calibration on {calibration} samples: {calibration_seconds:.1f} s (once per "
          f"run); {screener.margins}")


# --------------------------------------------------------------------------- (c)

class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's layout at V1's dimensions: learned positions, SDPA, plain cross-entropy."""

    def __init__(self, config: ModelConfig, seq_len: int):
        super().__init__()
        d = config.embedding_dim
        self.wte, self.wpe = nn.Embedding(config.vocab_size, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(NanoBlock(d, config.num_heads, config.pwff_hidden_dim)
                                    for _ in range(config.num_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, config.vocab_size)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def model_flops_per_token(model: nn.Module, config: ModelConfig, seq_len: int) -> float:
    """6 N + 12 L D S (nanoGPT's estimate); N without the embedding tables."""
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    n = sum(p.numel() for p in model.parameters()) - embeddings
    return 6 * n + 12 * config.num_layers * config.embedding_dim * seq_len


@dataclass(frozen=True)
class TrainRow:
    """One row of (c): which step, at how many rows per batch, with which options."""

    name: str
    nano: bool = False
    network_batch: bool = False      # the network's batch (16 rows) instead of train_batch
    compile: bool = False            # prepare_model(compile=True): each block compiled
    checkpointing: bool = False      # prepare_model(activation_checkpointing=True)


TRAIN_ROWS = (
    TrainRow("V1 (ours)"),
    TrainRow("V1 --compile", compile=True),
    TrainRow("nanoGPT-style", nano=True),
    TrainRow("V1 net batch", network_batch=True),
    TrainRow("V1 net ckpt", network_batch=True, checkpointing=True),
    TrainRow("V1 net --compile", network_batch=True, compile=True),
)


def time_steps(step, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first step, which includes any compilation; mean s/step after)."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return first, (time.perf_counter() - start) / steps


def training_step(model: nn.Module, sig_reg: SIGReg, batch: tuple[torch.Tensor, ...],
                  fused: bool):
    """One bf16-autocast step of `model`, as a closure. Ours is what `soma-models train`
    runs (`train_step.backward`: forward, on-chain loss, backward; then fused AdamW);
    the nanoGPT-style model returns its own plain cross-entropy."""
    inputs, targets, pos_ids, noise = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    device_type = inputs.device.type

    def step() -> None:
        if isinstance(model, Model):
            backward(model, sig_reg, inputs, targets, pos_ids, noise=noise, autocast_bf16=True)
        else:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = model(inputs, targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_batch(sizes: Sizes, rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    seq = sizes.seq_len
    rng = np.random.default_rng(3)
    tokens = torch.from_numpy(rng.integers(0, 256, (rows, seq + 1))).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos_ids = torch.arange(seq, device=device).expand(rows, seq)
    noise = torch.randn(sizes.v1.embedding_dim, sizes.slices, device=device)
    return inputs, targets, pos_ids, noise


def run_row(row: TrainRow, sizes: Sizes, device: torch.device, compile_backend: str
            ) -> tuple[int, float, float, float, float | None] | str:
    """(rows, first-step s, s/step, model FLOPs per token, peak GiB), or why it failed."""
    config, seq = sizes.v1, sizes.seq_len
    rows = sizes.batch_size if row.network_batch else sizes.train_batch
    torch._dynamo.reset()                       # each compiled row compiles for its shapes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = step = None
    try:
        with torch.device(device):
            model = NanoGPT(config, seq) if row.nano else Model(config)
        model.train()
        if not row.nano:
            prepare_model(model, compile=row.compile, compile_backend=compile_backend,
                          activation_checkpointing=row.checkpointing)
        step = training_step(model, SIGReg(SIGRegConfig(slices=sizes.slices)),
                             train_batch(sizes, rows, device), device.type == "cuda")
        first, seconds = time_steps(step, sizes.train_steps, device)
        flops = model_flops_per_token(model, config, seq)
    except torch.OutOfMemoryError:
        return f"{rows} rows: out of memory"
    finally:
        del model, step
        gc.collect()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    return rows, first, seconds, flops, peak if device.type == "cuda" else None


def section_training(sizes: Sizes, device: torch.device, peak_tflops: float | None,
                     compile_backend: str) -> None:
    config, seq = sizes.v1, sizes.seq_len
    print(f"\n== (c) bf16 autocast training step on {device.type}: {config.num_layers} layers, "
          f"D {config.embedding_dim}, hidden {config.pwff_hidden_dim}, seq {seq}, batch "
          f"{sizes.train_batch} and the network's {sizes.batch_size} rows ==")
    print(f"'net' = the network's batch; ckpt = activation checkpointing; --compile = each "
          f"block torch.compile'd ({compile_backend}); '1st s' = the first step (includes "
          f"compiling)")
    print(f"{'step':<18}{'rows':>5}{'1st s':>8}{'s/step':>8}{'tokens/s':>10}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'peak GiB':>10}")
    results: dict[str, tuple] = {}
    for row in TRAIN_ROWS:
        result = run_row(row, sizes, device, compile_backend)
        if isinstance(result, str):
            print(f"{row.name:<18}{result}")
            continue
        rows, first, seconds, flops_per_token, memory = result
        tokens_per_s = rows * seq / seconds
        flops = flops_per_token * tokens_per_s
        mfu = f"{flops / (peak_tflops * 1e12):.1%}" if peak_tflops else "n/a"
        mem = f"{memory:.1f}" if memory is not None else "-"
        print(f"{row.name:<18}{rows:>5}{first:>8.1f}{seconds:>8.3f}{tokens_per_s:>10.0f}"
              f"{flops / 1e12:>9.1f}{mfu:>7}{mem:>10}")
        results[row.name] = (tokens_per_s, first, seconds, memory)

    for name, rows in (("Flax bf16", sizes.train_batch), ("Flax net bf16", sizes.batch_size)):
        # `soma-models train --framework flax --bf16`'s step, on JAX's default device.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step, flops_per_token = fx.training_step(config, sizes.slices, rows, seq)
        first, seconds = time_steps(step, sizes.train_steps, device)
        del step
        gc.collect()
        tokens_per_s = rows * seq / seconds
        flops = flops_per_token * tokens_per_s
        mfu = f"{flops / (peak_tflops * 1e12):.1%}" if peak_tflops else "n/a"
        memory = fx.peak_gib()
        mem = f"{memory:.1f}" if memory is not None else "-"
        print(f"{name:<18}{rows:>5}{first:>8.1f}{seconds:>8.3f}{tokens_per_s:>10.0f}"
              f"{flops / 1e12:>9.1f}{mfu:>7}{mem:>10}")
        results[name] = (tokens_per_s, first, seconds, memory)
    print(f"(Flax rows: JAX on {fx.backend()}; peak GiB is JAX's, over the Flax rows so far)")

    def ratio(a: str, b: str, label: str) -> None:
        if a in results and b in results:
            print(f"{label}: {results[a][0] / results[b][0]:.2f}x")

    ratio("V1 (ours)", "nanoGPT-style", "ours / nanoGPT-style tokens/s (eager)")
    ratio("Flax bf16", "V1 (ours)", "flax / torch tokens/s (bf16, ours eager)")
    ratio("Flax net bf16", "V1 net batch", "flax / torch tokens/s (bf16, network batch)")
    ratio("V1 --compile", "nanoGPT-style", "ours --compile / nanoGPT-style tokens/s")
    ratio("V1 --compile", "V1 (ours)", "--compile / eager tokens/s")
    ratio("V1 net --compile", "V1 net batch", "--compile / eager tokens/s, network batch")
    for name in ("V1 --compile", "V1 net --compile"):
        eager = "V1 (ours)" if name == "V1 --compile" else "V1 net batch"
        if name in results and eager in results:
            print(f"compile time, {name}: ~{results[name][1] - results[eager][1]:.0f} s "
                  f"(first step minus the eager row's first step)")
    if "V1 net batch" in results and "V1 net ckpt" in results:
        no, yes = results["V1 net batch"][3], results["V1 net ckpt"][3]
        if no is not None and yes is not None:
            print(f"network batch peak memory: {no:.1f} GiB without activation checkpointing, "
                  f"{yes:.1f} GiB with (fits 80 GB: {'yes' if no < 80 else 'no'} without, "
                  f"{'yes' if yes < 80 else 'no'} with)")
    if not peak_tflops:
        print("(MFU: unknown device peak; pass --peak-tflops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: by device name)")
    parser.add_argument("--sections", default="a,b,c")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the --compile rows (default inductor; "
                             "aot_eager with --quick: graph capture without code generation)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = sizes_for(args.quick)
    peak = args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak or next((tf for frag, tf in BF16_PEAK_TFLOPS if frag in name), None)
        print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads), "
              f"torch {torch.__version__}: no GPU, so (a) compares the CPU with itself")
    print(f"sizes: {'quick' if args.quick else 'full'}")
    started = time.perf_counter()
    sections = set(args.sections.split(","))
    if "a" in sections:
        section_deviation(sizes, device)
    if "b" in sections:
        section_screening(sizes, device)
    if "c" in sections:
        backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
        section_training(sizes, device, peak, backend)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
