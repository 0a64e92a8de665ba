"""Flax against torch on this machine, side by side in one process: the training step and
the screening pass (the numbers issue 22 tracks).

    python benchmarks/bench_flax.py            # D 256, 4 layers, batch 4 x 512; 3 `small`
                                               # models x 12 samples for screening
    python benchmarks/bench_flax.py --quick    # tiny sizes (smoke run)
    python benchmarks/bench_flax.py --profile  # also: where the Flax step's time goes

Sections:
  step     one optimizer step of the on-chain loss (forward, loss, backward, clip, AdamW):
           `soma_models.v1.torch.train_step` against the jitted
           `soma_models.v1.flax.train_step`, same weights, same batch, same SIGReg noise.
           Both steps alternate, so a shared machine's load falls on both alike; the
           first-step losses must agree (rtol 1e-4) before any speed is reported.
  screen   `Screener.screen` over the same samples and models with the torch and the Flax
           backend, alternated in groups; losses must agree (rtol 1e-5).
  --profile  the Flax step's compiled HLO: time per XLA op category from a JAX profiler
           trace (what is inside XLA's kernels against what is ours).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = {"dim": 256, "layers": 4, "heads": 4, "hidden": 1024, "batch": 4, "seq": 512,
        "slices": 256, "steps": 4, "screen_preset": "small", "samples": 12, "groups": 3}
QUICK = {"dim": 64, "layers": 2, "heads": 4, "hidden": 256, "batch": 2, "seq": 128,
         "slices": 64, "steps": 2, "screen_preset": "tiny", "samples": 4, "groups": 2}


def step_section(sizes: dict) -> dict:
    import jax
    import torch
    from flax import nnx

    from soma_models.v1.configs import ModelConfig, SIGRegConfig
    from soma_models.v1.flax.modules.model import Model as FlaxModel
    from soma_models.v1.flax.modules.sig_reg import SIGReg as FlaxSIGReg
    from soma_models.v1.flax.serde import canonical_arrays as flax_canonical_arrays
    from soma_models.v1.flax.train_step import make_optimizer as flax_optimizer
    from soma_models.v1.flax.train_step import train_step as flax_train_step
    from soma_models.v1.torch.modules.model import Model as TorchModel
    from soma_models.v1.torch.modules.sig_reg import SIGReg as TorchSIGReg
    from soma_models.v1.torch.train_step import make_optimizer as torch_optimizer
    from soma_models.v1.torch.train_step import train_step as torch_train_step

    config = ModelConfig(embedding_dim=sizes["dim"], num_layers=sizes["layers"],
                         num_heads=sizes["heads"], pwff_hidden_dim=sizes["hidden"],
                         dropout_rate=0.0)
    sig_config = SIGRegConfig(slices=sizes["slices"])
    rng = np.random.default_rng(0)
    b, s = sizes["batch"], sizes["seq"]
    token_ids = rng.integers(0, 256, (b, s)).astype(np.int32)
    targets = np.roll(token_ids, -1, axis=1)
    pos_ids = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    noise = rng.standard_normal((sizes["dim"], sizes["slices"])).astype(np.float32)

    flax_model = FlaxModel(config, rngs=nnx.Rngs(0))
    # The same weights in both: the Flax model's canonical arrays, loaded into torch.
    torch_model = TorchModel.from_arrays(flax_canonical_arrays(flax_model))

    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)
    tx = flax_optimizer(1e-4, weight_decay=0.1, max_grad_norm=1.0)
    opt_state = tx.init(params)
    jitted = jax.jit(functools.partial(flax_train_step, graphdef, FlaxSIGReg(sig_config), tx),
                     donate_argnums=(0, 1, 2))
    t_opt = torch_optimizer(torch_model, lr=1e-4, weight_decay=0.1)
    t_sig = TorchSIGReg(sig_config)
    t_batch = tuple(torch.from_numpy(a).long() for a in (token_ids, targets, pos_ids))
    t_noise = torch.from_numpy(noise)
    j_batch = tuple(jax.numpy.asarray(a) for a in (token_ids, targets, pos_ids, noise))

    times: dict[str, list[float]] = {"torch": [], "flax": []}
    first = {}
    compile_start = time.perf_counter()
    params, rest, opt_state, loss = jitted(params, rest, opt_state, *j_batch)
    first["flax"] = float(loss)
    compile_seconds = time.perf_counter() - compile_start
    first["torch"] = torch_train_step(torch_model, t_sig, t_opt, t_batch, noise=t_noise,
                                      max_grad_norm=1.0).loss
    if not np.isclose(first["flax"], first["torch"], rtol=1e-4):
        raise SystemExit(f"first-step losses differ: flax {first['flax']} torch "
                         f"{first['torch']}")
    for _ in range(sizes["steps"]):
        start = time.perf_counter()
        params, rest, opt_state, loss = jitted(params, rest, opt_state, *j_batch)
        loss.block_until_ready()
        times["flax"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_train_step(torch_model, t_sig, t_opt, t_batch, noise=t_noise, max_grad_norm=1.0)
        times["torch"].append(time.perf_counter() - start)
    tokens = b * s
    print(f"\n== step: D {sizes['dim']}, {sizes['layers']} layers, batch {b} x {s}, "
          f"{sizes['slices']} SIGReg slices; {sizes['steps']} timed steps each, alternated ==")
    print(f"first-step loss: flax {first['flax']:.6f}  torch {first['torch']:.6f}; "
          f"flax compile {compile_seconds:.1f} s")
    for name, seconds in times.items():
        print(f"{name:<6} best {min(seconds):.3f} s/step  {tokens / min(seconds):8.0f} tokens/s")
    ratio = min(times["torch"]) / min(times["flax"])
    print(f"flax / torch tokens/s: {ratio:.2f}x (best step)")
    return {"jitted": jitted, "args": (params, rest, opt_state, *j_batch), "ratio": ratio}


def screen_section(sizes: dict) -> float:
    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights
    from soma_models.v1.screening import Screener

    folder = Path(tempfile.mkdtemp(prefix="soma-bench-flax-"))
    paths = []
    for seed in range(3):
        path = folder / f"model{seed}.safetensors"
        write_initial_weights(path, preset(sizes["screen_preset"]), seed=seed)
        paths.append(path)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, int(rng.integers(512, 4096)), dtype=np.uint8).tobytes()
               for _ in range(sizes["samples"])]
    targets = rng.standard_normal((1, preset(sizes["screen_preset"]).embedding_dim))
    groups = np.array_split(np.arange(len(samples)), sizes["groups"])
    seconds = {"torch": 0.0, "flax": 0.0}
    losses: dict[str, list] = {"torch": [], "flax": []}
    for g, group in enumerate(groups):
        order = ("torch", "flax") if g % 2 == 0 else ("flax", "torch")
        for framework in order:
            start = time.perf_counter()
            screener = Screener(paths, targets, framework=framework, seed=0)
            results = list(screener.screen([(str(i), samples[i]) for i in group]))
            seconds[framework] += time.perf_counter() - start
            losses[framework].extend(r.losses for r in results)
    if not np.allclose(losses["torch"], losses["flax"], rtol=1e-5):
        raise SystemExit("screening losses differ between torch and flax")
    print(f"\n== screen: 3 `{sizes['screen_preset']}` models, {len(samples)} samples of "
          f"0.5-4 KB, {sizes['groups']} alternated groups (model loading included) ==")
    for name, total in seconds.items():
        print(f"{name:<6} {total:7.2f} s  {len(samples) / total:6.2f} samples/s")
    ratio = seconds["torch"] / seconds["flax"]
    print(f"flax / torch samples/s: {ratio:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--sections", default="step,screen")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    import jax
    import torch

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax "
          f"{jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores")
    sections = set(args.sections.split(","))
    if "step" in sections:
        step_section(sizes)
    if "screen" in sections:
        screen_section(sizes)


if __name__ == "__main__":
    main()
