"""Evaluation and training speed/memory: the library's fast paths vs a straightforward
materialised implementation written out below, side by side in one run.

    python benchmarks/bench.py            # full sizes (V1 width; tens of minutes on 2 cores)
    python benchmarks/bench.py --quick    # tiny sizes, well under a minute (CI smoke run)

Sections:
  eval     one full-width V1 layer (D 2048, 8 heads, hidden 8192, vocab 264), batch 1,
           seq 8192: forward + on-chain loss (1024 SIGReg slices). Wall time, peak RSS,
           achieved GFLOP/s (causal attention counted at half its square) and its ratio
           to a plain float32 matmul measured in the same run.
  eval-0.1.7  the same layer at revision "0.1.7"'s evaluation shape: batch 16 x seq 1024,
           256 SIGReg slices (what the network scores today; SPEC §1).
  scaling  peak RSS and time against sequence length, both paths.
  train    the step `soma-models train` runs (`Trainer.train_step`) against a nanoGPT-style
           step of the same model written below (SDPA causal, fused AdamW, plain
           cross-entropy, no SIGReg), D 512, 8 layers, seq 1024, batch 8. Both live in
           one process and their steps alternate, so a shared machine's load falls on
           both alike; best and mean step of each.

Every eval measurement runs in a fresh subprocess (this file with --child), so each
variant's peak RSS (`ru_maxrss`) is its own. Both paths use the same weights, data and
noise; the script checks that their losses agree (rtol 1e-4) before it reports any speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

# --- sizes --------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalCase:
    dim: int
    heads: int
    hidden: int
    layers: int
    vocab: int
    batch: int
    seq: int
    slices: int
    path: str                    # "ours" or "straightforward"
    matmul_size: int = 2048      # the in-process matmul reference


@dataclass(frozen=True)
class TrainCase:
    dim: int
    heads: int
    hidden: int
    layers: int
    vocab: int
    batch: int
    seq: int
    slices: int
    steps: int
    path: str


FULL = {
    "eval": {"dim": 2048, "heads": 8, "hidden": 8192, "layers": 1, "vocab": 264, "batch": 1,
             "seq": 8192, "slices": 1024},
    "eval-0.1.7": {"dim": 2048, "heads": 8, "hidden": 8192, "layers": 1, "vocab": 264,
                   "batch": 16, "seq": 1024, "slices": 256},
    "scaling": [1024, 2048, 4096, 8192],
    # slices 0: the trainer's default (the chain's, for the selected revision).
    "train": {"dim": 512, "heads": 8, "hidden": 2048, "layers": 8, "vocab": 264, "batch": 8,
              "seq": 1024, "slices": 0, "steps": 3},
    "matmul": 2048,
}
QUICK = {
    "eval": {"dim": 128, "heads": 4, "hidden": 512, "layers": 1, "vocab": 264, "batch": 1,
             "seq": 512, "slices": 64},
    "eval-0.1.7": {"dim": 128, "heads": 4, "hidden": 512, "layers": 1, "vocab": 264,
                   "batch": 4, "seq": 128, "slices": 32},
    "scaling": [256, 512],
    "train": {"dim": 64, "heads": 4, "hidden": 256, "layers": 2, "vocab": 264, "batch": 2,
              "seq": 128, "slices": 64, "steps": 2},
    "matmul": 512,
}


# --- the straightforward implementation (plain torch, everything materialised) -------


def straightforward_encode(model, token_ids, pos_ids):
    """The V1 forward written plainly: [B, H, S, S] scores with the -1e4 fill."""
    import torch
    import torch.nn.functional as F

    config = model.config
    hd = config.head_dim
    x = model.embedding.weight[token_ids]
    # RoPE angles: float32 position divided by max_wavelength ** (2i / hd).
    frac = (2.0 * torch.arange(hd // 2, dtype=torch.float32)) / hd
    timescale = torch.tensor(config.max_wavelength, dtype=torch.float32) ** frac
    angle = pos_ids.float()[:, :, None] / timescale / config.scale_factor      # [B, S, hd/2]
    cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]            # [B, 1, S, hd/2]
    seq = token_ids.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)

    def heads(t):
        return t.view(t.shape[0], seq, config.num_heads, hd).transpose(1, 2)   # [B, H, S, hd]

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    for layer in model.encoder.layers:
        att = layer.attention
        h = F.layer_norm(x, (config.embedding_dim,), layer.norm_1.weight, layer.norm_1.bias, 1e-5)
        q = rope(heads(F.linear(h, att.query.weight, att.query.bias)))
        k = rope(heads(F.linear(h, att.key.weight, att.key.bias)))
        v = heads(F.linear(h, att.value.weight, att.value.bias))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        weights = torch.softmax(scores.masked_fill(future, -1.0e4), dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(context, att.output.weight, att.output.bias)
        h = F.layer_norm(x, (config.embedding_dim,), layer.norm_2.weight, layer.norm_2.bias, 1e-5)
        hidden = F.gelu(F.linear(h, layer.pwff.linear_inner.weight, layer.pwff.linear_inner.bias))
        x = x + F.linear(hidden, layer.pwff.linear_outer.weight, layer.pwff.linear_outer.bias)
    final = model.final_norm
    return F.layer_norm(x, (config.embedding_dim,), final.weight, final.bias, 1e-5)


def straightforward_sig_reg(reps, noise, t_max=3.0, points=17):
    """SPEC §5 with the [B, S, slices, points] tensor materialised."""
    import torch

    dt = t_max / (points - 1)
    t = torch.arange(points, dtype=torch.float32) * dt
    phi = torch.exp(-t * t / 2)
    trapezoid = torch.full((points,), 2 * dt)
    trapezoid[0] = trapezoid[-1] = dt
    weights = phi * trapezoid
    directions = noise / noise.norm(dim=0, keepdim=True)
    angle = (reps @ directions)[..., None] * t                      # [B, S, slices, points]
    c, z = torch.cos(angle).mean(-2), torch.sin(angle).mean(-2)
    return (noise.shape[1] * (((c - phi) ** 2 + z * z) * weights).sum(-1)).mean()


def straightforward_loss(model, token_ids, targets, pos_ids, noise):
    import torch.nn.functional as F

    reps = straightforward_encode(model, token_ids, pos_ids)
    logits = F.linear(reps, model.predictor.weight, model.predictor.bias)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=256, reduction="sum") / targets.numel()
    return ce + 0.02 * straightforward_sig_reg(reps, noise)


# --- children -----------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(case, torch):
    from soma_models.v1.configs import ModelConfig
    from soma_models.v1.torch.modules.model import Model

    config = ModelConfig(embedding_dim=case.dim, pwff_hidden_dim=case.hidden,
                         num_layers=case.layers, num_heads=case.heads, vocab_size=case.vocab)
    torch.manual_seed(0)
    model = Model(config)
    generator = torch.Generator().manual_seed(1)
    shape = (case.batch, case.seq)
    token_ids = torch.randint(0, 256, shape, generator=generator)
    targets = torch.randint(0, 256, shape, generator=generator)
    pos_ids = torch.arange(case.seq).expand(shape)
    noise = torch.randn(case.dim, case.slices, generator=generator)
    return model, token_ids, targets, pos_ids, noise


def eval_flops(case) -> float:
    """Useful FLOPs of one forward + loss; causal attention at half its square."""
    tokens = case.batch * case.seq
    linears = 2 * tokens * (4 * case.dim**2 + 2 * case.dim * case.hidden) * case.layers
    attention = 2 * case.batch * case.seq**2 * case.dim * case.layers     # (QK + PV) / 2
    head = 2 * tokens * case.dim * (case.vocab + case.slices)
    return float(linears + attention + head)


def child_eval(case: EvalCase) -> dict:
    import torch

    from soma_models.v1.configs import SIGRegConfig
    from soma_models.v1.torch.loss import compute_loss
    from soma_models.v1.torch.modules.sig_reg import SIGReg

    model, token_ids, targets, pos_ids, noise = build(case, torch)
    model.eval()
    sig_reg = SIGReg(SIGRegConfig(slices=case.slices))

    def run():
        if case.path == "ours":
            return compute_loss(model, sig_reg, token_ids, targets, pos_ids, noise)[0]
        return straightforward_loss(model, token_ids, targets, pos_ids, noise)

    with torch.no_grad():
        # Warm-up on a short prefix: thread pool, kernel dispatch, first-touch of weights.
        warm = min(case.seq, 64)
        if case.path == "ours":
            compute_loss(model, sig_reg, token_ids[:, :warm], targets[:, :warm],
                         pos_ids[:, :warm], noise)
        else:
            straightforward_loss(model, token_ids[:, :warm], targets[:, :warm],
                                 pos_ids[:, :warm], noise)
        baseline = current_rss_mb()
        # The matmul reference right before the timed run, in the same process: on a
        # shared machine the rate drifts, and the ratio should compare like with like.
        matmul = matmul_gflops(case.matmul_size, seconds=1.5 if case.matmul_size >= 1024 else 0.3)
        start = time.perf_counter()
        loss = run()
        seconds = time.perf_counter() - start
    return {"loss": float(loss), "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline, "gflops": eval_flops(case) / seconds / 1e9,
            "matmul_gflops": matmul}


# --- the nanoGPT-style baseline step (plain torch, what a minimal trainer would run) ----


class NanoGPTStep:
    """One training step of the V1 model written the nanoGPT way, from a copy of `model`.

    Same weights and architecture (pre-norm blocks, exact GELU, half-split RoPE), but
    the plain kernels: RoPE's sin/cos once per forward, `F.scaled_dot_product_attention`
    with `is_causal=True` (the -inf mask, not the runtime's -1e4 fill), mean
    cross-entropy over non-PAD targets, no SIGReg, fused AdamW with decay on matrices,
    gradient clipping at 1.0 (nanoGPT's defaults).
    """

    def __init__(self, model, lr: float = 1e-4, weight_decay: float = 0.1):
        import copy

        import torch

        self.model = copy.deepcopy(model)
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95), fused=True)

    def forward(self, token_ids, pos_ids):
        import torch
        import torch.nn.functional as F

        model, config = self.model, self.model.config
        batch, seq = token_ids.shape
        heads, hd = config.num_heads, config.head_dim
        inverse_frequency = 1.0 / (config.max_wavelength
                                   ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angle = pos_ids.float()[:, None, :, None] * inverse_frequency / config.scale_factor
        cos, sin = angle.cos(), angle.sin()                            # [B, 1, S, hd/2]

        def rope(t):
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

        x = model.embedding(token_ids)
        for layer in model.encoder.layers:
            att = layer.attention
            h = layer.norm_1(x)
            q, k, v = (proj(h).view(batch, seq, heads, hd).transpose(1, 2)
                       for proj in (att.query, att.key, att.value))
            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + att.output(y.transpose(1, 2).reshape(batch, seq, -1))
            mlp = layer.pwff
            x = x + mlp.linear_outer(F.gelu(mlp.linear_inner(layer.norm_2(x))))
        return model.predictor(model.final_norm(x))

    def step(self, token_ids, targets, pos_ids) -> float:
        import torch
        import torch.nn.functional as F

        logits = self.forward(token_ids, pos_ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=256)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def child_train(case: TrainCase) -> dict:
    """The trainer's step and the nanoGPT step, alternated in this one process."""
    import tempfile

    import numpy as np
    import torch

    from soma_models.train.trainer import TrainConfig, Trainer

    folder = tempfile.mkdtemp(prefix="soma-bench-")
    corpus = os.path.join(folder, "corpus.bin")
    rows_needed = 4 * case.batch * (case.steps + 1)        # more chunks than the run uses
    with open(corpus, "wb") as fh:
        fh.write(np.random.default_rng(0).integers(0, 256, rows_needed * case.seq,
                                                   dtype=np.uint8).tobytes())
    cfg = TrainConfig(data=[corpus], out_dir=os.path.join(folder, "run"), config="tiny",
                      embedding_dim=case.dim, num_layers=case.layers, num_heads=case.heads,
                      pwff_hidden_dim=case.hidden, seq_len=case.seq, batch_size=case.batch,
                      steps=1000, warmup_steps=0, lr=1e-4, shuffle=False, eval_every=0,
                      checkpoint_every=0, progress=False, plot=False, device="cpu")
    if case.slices:
        cfg.sig_reg_slices = case.slices
    trainer = Trainer(cfg)
    model = trainer.module.model if hasattr(trainer.module, "model") else trainer.module
    baseline = NanoGPTStep(model)
    # The baseline trains on the trainer's own first batch (same rows every step).
    batch = trainer.train_table.rows(np.arange(case.batch))
    token_ids, targets, pos_ids = (torch.from_numpy(a).long()
                                   for a in (batch.token_ids, batch.targets, batch.pos_ids))
    timings: dict[str, list[float]] = {"trainer": [], "nanogpt": []}
    first: dict[str, float] = {}
    for step in range(case.steps + 1):                    # step 0: warm-up, not timed
        start = time.perf_counter()
        record = trainer.train_step()
        seconds = time.perf_counter() - start
        if step == 0:
            first["trainer_ce"] = record["train_ce"]
        else:
            timings["trainer"].append(seconds)
        start = time.perf_counter()
        loss = baseline.step(token_ids, targets, pos_ids)
        seconds = time.perf_counter() - start
        if step == 0:
            first["nanogpt_ce"] = loss
        else:
            timings["nanogpt"].append(seconds)
    tokens = case.batch * case.seq
    return {"first": first, "step_seconds": timings, "tokens": tokens,
            "slices": trainer.cfg.sig_reg_slices, "peak_rss_mb": peak_rss_mb()}


def matmul_gflops(size: int, seconds: float = 2.0) -> float:
    """Rate of a plain float32 `[size, size] @ [size, size]`, repeated for `seconds`."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or repeats < 3:
        a @ b
        repeats += 1
    return 2 * size**3 / ((time.perf_counter() - start) / repeats) / 1e9


def child_matmul(size: int) -> dict:
    return {"gflops": matmul_gflops(size)}


def child_main(spec: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    kind = spec.pop("kind")
    if kind == "eval":
        result = child_eval(EvalCase(**spec))
    elif kind == "train":
        result = child_train(TrainCase(**spec))
    else:
        result = child_matmul(spec["size"])
    print("RESULT " + json.dumps(result), flush=True)


# --- parent -------------------------------------------------------------------------


def run_child(spec: dict, threads: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child {spec} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")


def best_of(spec: dict, threads: int, repeats: int) -> dict[str, dict]:
    """Both paths, alternated `repeats` times in fresh processes; the fastest run of each.

    On a machine shared with other work, the minimum is the run least disturbed.
    """
    runs: dict[str, list[dict]] = {"ours": [], "straightforward": []}
    for _ in range(repeats):
        for path, results in runs.items():
            results.append(run_child({**spec, "path": path}, threads))
    return {path: min(results, key=lambda r: r["seconds"]) for path, results in runs.items()}


def check_same_loss(ours: float, straight: float, what: str) -> None:
    if not math.isclose(ours, straight, rel_tol=1e-4, abs_tol=1e-5):
        raise SystemExit(f"{what}: losses differ (ours {ours}, straightforward {straight})")


def section_eval(sizes: dict, threads: int, repeats: int, key: str = "eval") -> dict[int, dict]:
    print(f"\n== {key}: forward + on-chain loss ==")
    e = sizes[key]
    print(f"config: D {e['dim']}, heads {e['heads']}, hidden {e['hidden']}, layers "
          f"{e['layers']}, vocab {e['vocab']}, batch {e['batch']}, seq {e['seq']}, "
          f"slices {e['slices']}; {eval_flops(EvalCase(path='', **e)) / 1e9:.1f} GFLOP")
    results = best_of({"kind": "eval", **e, "matmul_size": sizes["matmul"]}, threads, repeats)
    check_same_loss(results["ours"]["loss"], results["straightforward"]["loss"], "eval")
    print(f"best of {repeats} alternated runs per path; 'of matmul' = achieved GFLOP/s over a "
          f"{sizes['matmul']}^3 float32 matmul timed in the same process just before")
    print(f"{'path':<16}{'wall s':>9}{'peak RSS MB':>13}{'(setup MB)':>12}{'GFLOP/s':>10}"
          f"{'matmul':>9}{'of matmul':>11}")
    for path, r in results.items():
        print(f"{path:<16}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['baseline_rss_mb']:>12.0f}{r['gflops']:>10.1f}{r['matmul_gflops']:>9.1f}"
              f"{r['gflops'] / r['matmul_gflops']:>10.0%}")
    ours, straight = results["ours"], results["straightforward"]
    print(f"ours / straightforward: wall {ours['seconds'] / straight['seconds']:.2f}x, "
          f"peak RSS {ours['peak_rss_mb'] / straight['peak_rss_mb']:.2f}x; "
          f"loss {ours['loss']:.6f} vs {straight['loss']:.6f}")
    return {e["seq"]: results}


def section_scaling(sizes: dict, threads: int, known: dict[int, dict], repeats: int) -> None:
    print("\n== scaling: eval config against sequence length ==")
    print(f"{'seq':>6}{'ours s':>9}{'ours MB':>9}{'(+setup)':>10}{'straight s':>12}"
          f"{'straight MB':>13}{'(+setup)':>10}")
    for seq in sizes["scaling"]:
        results = known.get(seq) or best_of(
            {"kind": "eval", **sizes["eval"], "seq": seq, "matmul_size": sizes["matmul"]},
            threads, repeats)
        check_same_loss(results["ours"]["loss"], results["straightforward"]["loss"],
                        f"scaling seq {seq}")
        o, s = results["ours"], results["straightforward"]
        print(f"{seq:>6}{o['seconds']:>9.2f}{o['peak_rss_mb']:>9.0f}"
              f"{o['peak_rss_mb'] - o['baseline_rss_mb']:>10.0f}{s['seconds']:>12.2f}"
              f"{s['peak_rss_mb']:>13.0f}{s['peak_rss_mb'] - s['baseline_rss_mb']:>10.0f}")
    print(f"(+setup) = peak RSS minus RSS after building the model and inputs; best of "
          f"{repeats} alternated runs per path (except rows reused from the eval section)")


def section_train(sizes: dict, threads: int, quick: bool) -> None:
    t = sizes["train"]
    print("\n== train: the step of `soma-models train` against a nanoGPT-style step ==")
    result = run_child({"kind": "train", **t, "path": "both"}, threads)
    print(f"config: D {t['dim']}, heads {t['heads']}, hidden {t['hidden']}, layers "
          f"{t['layers']}, batch {t['batch']}, seq {t['seq']}; trainer SIGReg slices "
          f"{result['slices']}; {t['steps']} timed steps of each after 1 warm-up, "
          f"alternated in one process")
    # Same model, same first batch: the trainer's cross-entropy per predicted token and
    # the baseline's mean cross-entropy must agree before any speed is reported.
    first = result["first"]
    check_same_loss(first["trainer_ce"], first["nanogpt_ce"], "train (first-step CE)")
    print(f"{'path':<10}{'best s/step':>13}{'mean s/step':>13}{'best tokens/s':>15}")
    best = {}
    for path, seconds in result["step_seconds"].items():
        best[path] = min(seconds)
        print(f"{path:<10}{min(seconds):>13.2f}{sum(seconds) / len(seconds):>13.2f}"
              f"{result['tokens'] / min(seconds):>15.0f}")
    mean = {p: sum(s) / len(s) for p, s in result["step_seconds"].items()}
    print(f"trainer / nanoGPT tokens/s: {best['nanogpt'] / best['trainer']:.2f}x (best step), "
          f"{mean['nanogpt'] / mean['trainer']:.2f}x (mean); peak RSS "
          f"{result['peak_rss_mb']:.0f} MB (both models in one process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: all cores)")
    parser.add_argument("--sections", default="eval,eval-0.1.7,scaling,train",
                        help="comma-separated subset of eval,eval-0.1.7,scaling,train")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternated runs per eval/scaling variant, best kept "
                             "(default 2; 1 with --quick)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="timed steps of each path in the train section (default 3; "
                             "2 with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child), args.threads)
        return
    sizes = QUICK if args.quick else FULL
    if args.train_steps:
        sizes = {**sizes, "train": {**sizes["train"], "steps": args.train_steps}}
    sections = set(args.sections.split(","))
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}{', QUICK sizes' if args.quick else ''}")
    matmul = run_child({"kind": "matmul", "size": sizes["matmul"]}, args.threads)["gflops"]
    print(f"plain float32 matmul ({sizes['matmul']}^3): {matmul:.1f} GFLOP/s")
    repeats = args.repeats or (1 if args.quick else 2)
    known: dict[int, dict] = {}
    if "eval" in sections:
        known = section_eval(sizes, args.threads, repeats)
    if "eval-0.1.7" in sections:
        section_eval(sizes, args.threads, repeats, key="eval-0.1.7")
    if "scaling" in sections:
        section_scaling(sizes, args.threads, known, repeats)
    if "train" in sections:
        section_train(sizes, args.threads, args.quick)
    if not args.quick:
        matmul_end = run_child({"kind": "matmul", "size": sizes["matmul"]},
                               args.threads)["gflops"]
        print(f"\nplain float32 matmul again at the end: {matmul_end:.1f} GFLOP/s "
              f"(a large change means the machine was busy)")


if __name__ == "__main__":
    main()
