"""Flax against torch on this machine, side by side in one process: the training step and
the screening pass (the numbers issue 22 tracks).

    python benchmarks/bench_flax.py            # D 256, 4 layers, batch 4 x 512; 3 `small`
                                               # models x 12 samples for screening
    python benchmarks/bench_flax.py --quick    # tiny sizes (smoke run)

Sections:
  step     one optimizer step of the on-chain loss (forward, loss, backward, clip, AdamW):
           `soma_models.v1.torch.train_step` against the jitted
           `soma_models.v1.flax.train_step`, same weights, same batch, same SIGReg noise.
           Both steps alternate, so a shared machine's load falls on both alike; the
           first-step losses must agree (rtol 1e-4) before any speed is reported.
  screen   `Screener.screen` over the same samples and models with the torch and the Flax
           backend, alternated in groups, in two rounds: the first includes Flax's compile
           of every new pass size, the second is steady state; losses must agree (rtol
           1e-5). Then one full pass through one model, best of 5 alternated calls.
  kernels  where the screening gap lay: one float32 cos over a [4096, 256] array, and
           SIGReg's per-position values (256 slices, 17 points) of `[rows, 1024, D]`
           representations, with our `sin_cos` and with XLA's own sin and cos, and the
           model's LayerNorm over 16 x 1024 rows, XLA against torch, alternated.
  profile  one screening pass of each backend under its profiler (jax.profiler's perfetto
           trace of XLA:CPU's thunks, each fusion named through the compiled HLO's stack
           frames; torch.profiler with stacks), time grouped by the innermost function of
           ours (or the library's) each kernel comes from: where the time goes, side by side.
  precision  what our exactness costs on XLA:CPU: the Flax step as the library compiles
           it (every matmul `Precision.HIGHEST`, true divisions behind an optimisation
           barrier) against the same step with DEFAULT precision, and also without the
           barrier (the modules' constants swapped for this measurement only), alternated.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

FULL = {"dim": 256, "layers": 4, "heads": 4, "hidden": 1024, "batch": 4, "seq": 512,
        "slices": 256, "steps": 4, "screen_preset": "small", "samples": 12, "groups": 3}
QUICK = {"dim": 64, "layers": 2, "heads": 4, "hidden": 256, "batch": 2, "seq": 128,
         "slices": 64, "steps": 2, "screen_preset": "tiny", "samples": 4, "groups": 2}


def build_steps(sizes: dict) -> tuple:
    """(flax_step, torch_step, first losses (flax, torch), Flax's compile seconds): each
    step callable runs one optimizer step of its framework on the same batch and SIGReg
    noise and returns the loss; both start from the same weights (the Flax model's
    canonical arrays, loaded into torch). The first step of each runs here (Flax compiles
    there) and must agree to rtol 1e-4."""
    import jax
    import torch
    from flax import nnx

    from soma_models.v1.configs import ModelConfig, SIGRegConfig
    from soma_models.v1.flax.modules.model import Model as FlaxModel
    from soma_models.v1.flax.modules.sig_reg import SIGReg as FlaxSIGReg
    from soma_models.v1.flax.serde import canonical_arrays
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
    arrays = (token_ids, np.roll(token_ids, -1, axis=1),
              np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy())
    noise = rng.standard_normal((sizes["dim"], sizes["slices"])).astype(np.float32)

    flax_model = FlaxModel(config, rngs=nnx.Rngs(0))
    torch_model = TorchModel.from_arrays(canonical_arrays(flax_model))
    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)
    tx = flax_optimizer(1e-4, weight_decay=0.1, max_grad_norm=1.0)
    state = [params, rest, tx.init(params)]
    jitted = jax.jit(functools.partial(flax_train_step, graphdef, FlaxSIGReg(sig_config), tx),
                     donate_argnums=(0, 1, 2))
    j_batch = tuple(jax.numpy.asarray(a) for a in (*arrays, noise))

    def flax_step() -> float:
        state[0], state[1], state[2], loss = jitted(*state, *j_batch)
        return float(loss)                                  # waits for the step

    t_opt = torch_optimizer(torch_model, lr=1e-4, weight_decay=0.1)
    t_sig = TorchSIGReg(sig_config)
    t_batch = tuple(torch.from_numpy(a).long() for a in arrays)
    t_noise = torch.from_numpy(noise)

    def torch_step() -> float:
        return torch_train_step(torch_model, t_sig, t_opt, t_batch, noise=t_noise,
                                max_grad_norm=1.0).loss

    compile_start = time.perf_counter()
    first_flax = flax_step()
    compile_seconds = time.perf_counter() - compile_start
    first = (first_flax, torch_step())
    if not np.isclose(*first, rtol=1e-4):
        raise SystemExit(f"first-step losses differ: flax {first[0]} torch {first[1]}")
    return flax_step, torch_step, first, compile_seconds


def time_steps(flax_step, torch_step, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each, alternated (the order flips every step)."""
    times: dict[str, list[float]] = {"flax": [], "torch": []}
    for i in range(steps):
        order = (("flax", flax_step), ("torch", torch_step))
        for name, step in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def step_section(sizes: dict) -> float:
    flax_step, torch_step, first, compile_seconds = build_steps(sizes)
    times = time_steps(flax_step, torch_step, sizes["steps"])
    b, s = sizes["batch"], sizes["seq"]
    tokens = b * s
    print(f"\n== step: D {sizes['dim']}, {sizes['layers']} layers, batch {b} x {s}, "
          f"{sizes['slices']} SIGReg slices; {sizes['steps']} timed steps each, alternated ==")
    print(f"first-step loss: flax {first[0]:.6f}  torch {first[1]:.6f}; "
          f"flax compile {compile_seconds:.1f} s")
    for name in ("torch", "flax"):
        seconds = times[name]
        print(f"{name:<6} best {min(seconds):.3f} s/step  {tokens / min(seconds):8.0f} tokens/s")
    ratio = min(times["torch"]) / min(times["flax"])
    print(f"flax / torch tokens/s: {ratio:.2f}x (best step)")
    return ratio


def _screening_inputs(sizes: dict) -> tuple[list[Path], list[bytes], np.ndarray]:
    """(3 model files of the screening preset, the samples, one target embedding)."""
    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights

    folder = Path(tempfile.mkdtemp(prefix="soma-bench-flax-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    paths = []
    for seed in range(3):
        path = folder / f"model{seed}.safetensors"
        write_initial_weights(path, preset(sizes["screen_preset"]), seed=seed)
        paths.append(path)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, int(rng.integers(512, 4096)), dtype=np.uint8).tobytes()
               for _ in range(sizes["samples"])]
    targets = rng.standard_normal((1, preset(sizes["screen_preset"]).embedding_dim))
    return paths, samples, targets


def screen_section(sizes: dict) -> float:
    from soma_models.v1.screening import Screener

    paths, samples, targets = _screening_inputs(sizes)
    groups = np.array_split(np.arange(len(samples)), sizes["groups"])
    # Two rounds over the same groups: in the first, Flax compiles each pass size it meets
    # for the first time (one per row count; torch compiles nothing); the second is what
    # a long screening run sees once its pass sizes have been met.
    seconds = {(r, name): 0.0 for r in ("first", "second") for name in ("torch", "flax")}
    losses: dict[str, list] = {"torch": [], "flax": []}
    for round_name in ("first", "second"):
        for g, group in enumerate(groups):
            order = ("torch", "flax") if g % 2 == 0 else ("flax", "torch")
            for framework in order:
                start = time.perf_counter()
                screener = Screener(paths, targets, framework=framework, seed=0)
                results = list(screener.screen([(str(i), samples[i]) for i in group]))
                seconds[(round_name, framework)] += time.perf_counter() - start
                losses[framework].extend(r.losses for r in results)
    if not np.allclose(losses["torch"], losses["flax"], rtol=1e-5):
        raise SystemExit("screening losses differ between torch and flax")
    print(f"\n== screen: 3 `{sizes['screen_preset']}` models, {len(samples)} samples of "
          f"0.5-4 KB, {sizes['groups']} alternated groups (model loading included), "
          "twice ==")
    ratios = {}
    for round_name, what in (("first", "first round (Flax compiles each new pass size)"),
                             ("second", "second round (pass sizes already compiled)")):
        print(what)
        for name in ("torch", "flax"):
            total = seconds[(round_name, name)]
            print(f"  {name:<6} {total:7.2f} s  {len(samples) / total:6.2f} samples/s")
        ratios[round_name] = seconds[(round_name, "torch")] / seconds[(round_name, "flax")]
        print(f"  flax / torch samples/s: {ratios[round_name]:.2f}x")
    # One full pass through one model's backend, best of 5 alternated calls: the
    # steady-state figure a shared machine's load spoils least (totals above add up
    # every slowdown; a best time needs one quiet moment per framework).
    rows = Screener(paths, targets, seed=0).rows_per_pass
    rng = np.random.default_rng(1)
    token_ids = rng.integers(0, 256, (rows, 1024)).astype(np.int32)
    pos_ids = np.broadcast_to(np.arange(1024), (rows, 1024)).copy()
    noise = rng.standard_normal((targets.shape[1], 256)).astype(np.float32)
    backends = {name: Screener(paths[:1], targets, framework=name, seed=0).backends[0]
                for name in ("torch", "flax")}
    best = {}
    for name, backend in backends.items():
        backend.row_terms(token_ids, token_ids, pos_ids, [noise], np.zeros(rows, int))
        best[name] = float("inf")
    for _ in range(5):
        for name, backend in backends.items():
            start = time.perf_counter()
            backend.row_terms(token_ids, token_ids, pos_ids, [noise], np.zeros(rows, int))
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"one pass of {rows} rows x 1024 through one model (best of 5, alternated): torch "
          f"{best['torch'] * 1e3:.0f} ms, flax {best['flax'] * 1e3:.0f} ms, flax / torch "
          f"speed {best['torch'] / best['flax']:.2f}x")
    return ratios["second"]


def precision_section(sizes: dict) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import soma_models.v1.flax.modules.attention as attention
    import soma_models.v1.flax.modules.attention_kernels as kernels
    import soma_models.v1.flax.modules.model as model_module
    import soma_models.v1.flax.modules.pwff as pwff
    import soma_models.v1.flax.modules.sig_reg as sig_reg
    from soma_models.v1.configs import ModelConfig, SIGRegConfig
    from soma_models.v1.flax.train_step import make_optimizer, train_step

    config = ModelConfig(embedding_dim=sizes["dim"], num_layers=sizes["layers"],
                         num_heads=sizes["heads"], pwff_hidden_dim=sizes["hidden"])
    rng = np.random.default_rng(0)
    b, s = sizes["batch"], sizes["seq"]
    token_ids = jnp.asarray(rng.integers(0, 256, (b, s)), dtype=jnp.int32)
    batch = (token_ids, jnp.roll(token_ids, -1, axis=1),
             jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
             jnp.asarray(rng.standard_normal((sizes["dim"], sizes["slices"])), jnp.float32))

    def build():
        """A compiled step of a fresh model, traced under the modules' current constants."""
        model = model_module.Model(config, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = make_optimizer(1e-4, max_grad_norm=1.0)
        state = [params, rest, tx.init(params)]
        jitted = jax.jit(functools.partial(
            train_step, graphdef, sig_reg.SIGReg(SIGRegConfig(slices=sizes["slices"])), tx))

        def step() -> float:
            state[0], state[1], state[2], loss = jitted(*state, *batch)
            return float(loss)
        step()                                                        # compile now
        return step

    modules = (attention, kernels, model_module, pwff, sig_reg)
    saved = [(m, m.__dict__.get("HIGHEST"), m.__dict__.get("exact_divide")) for m in modules]
    variants = {"HIGHEST + barrier (ours)": build()}
    try:
        for m in modules:
            if "HIGHEST" in m.__dict__:
                m.HIGHEST = jax.lax.Precision.DEFAULT
        variants["DEFAULT + barrier"] = build()
        for m in modules:
            if "exact_divide" in m.__dict__:
                m.exact_divide = lambda a, d: a / d
        variants["DEFAULT, plain division"] = build()
    finally:
        for m, highest, divide in saved:
            if highest is not None:
                m.HIGHEST = highest
            if divide is not None:
                m.exact_divide = divide
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(sizes["steps"]):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ours = min(times["HIGHEST + barrier (ours)"])
    print(f"\n== precision: the Flax step on {jax.default_backend()}, same sizes as the step "
          f"section; {sizes['steps']} steps of each, alternated ==")
    for name, seconds in times.items():
        print(f"{name:<26} best {min(seconds):.3f} s/step  speed vs ours "
              f"{ours / min(seconds):.2f}x")


# The Flax backend's compiled screening functions, the ones `--sections profile` names.
PROFILED_MODULES = "jit__row_forward|jit__sig_reg_rows"
OURS = f"soma_models{os.sep}v1{os.sep}"


def _share(frames: list[tuple[str, str]]) -> str:
    """Which part of the screening pass a kernel belongs to, from its Python stack
    `[(file, function)]`, innermost first."""
    files = [os.path.basename(f) for f, _ in frames if OURS in f]
    functions = [fn for f, fn in frames if OURS in f]
    if "sig_reg.py" in files:
        return "SIGReg"
    if "loss.py" in files:
        return "cross-entropy"
    if any(fn.endswith("predict") for fn in functions):
        return "predictor"
    if "encoder.py" in files:
        return "encoder layers"
    return "embedding, final norm, other"


def _label(frames: list[tuple[str, str]], op: str) -> str:
    """'innermost function of ours < innermost function: op' for a kernel's stack."""
    ours = next((fn for f, fn in frames if OURS in f), "?")
    inner = frames[0][1] if frames else "?"
    where = ours if inner == ours else f"{ours} < {inner}"
    return f"{where}: {op}"


# The HLO opcodes that name a fusion (elementwise arithmetic and data movement do not).
HEAVY_OPS = ("dot", "convolution", "reduce", "reduce-window", "exponential", "log", "sine",
             "cosine", "tanh", "erf", "rsqrt", "sqrt", "divide", "gather", "custom-call")


def _hlo_op_stacks(dump: str) -> dict[tuple[str, str], tuple[list, str, str]]:
    """(module, HLO op) -> (Python stack `[(file, function)]` innermost first, what it
    computes: a JAX primitive, or a fusion's heavy HLO ops, and JAX's full op name of it,
    `jit(f)/transpose(jvp())/...`, a fusion's being its root op's), read from the compiled
    modules XLA dumped (the stack-frame tables after the module)."""
    ops = {}
    for path in glob.glob(os.path.join(dump, "*.cpu_after_optimizations.txt")):
        text = Path(path).read_text()
        module = text.split(",", 1)[0].split()[1]
        tables = {}
        for table in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            found = re.search(rf"^{table}\n(.*?)\n\n", text, re.S | re.M)
            rows = found.group(1).splitlines() if found else []
            tables[table] = dict(row.split(" ", 1) for row in rows)

        def field(row: str, key: str) -> str:
            return re.search(rf"{key}=(\d+)", row).group(1)

        def stack(frame: str) -> list[tuple[str, str]]:
            frames, seen = [], set()
            while frame in tables["StackFrames"] and frame not in seen:
                seen.add(frame)
                row = tables["StackFrames"][frame]
                location = tables["FileLocations"][field(row, "file_location_id")]
                frames.append((tables["FileNames"][field(location, "file_name_id")].strip('"'),
                               tables["FunctionNames"][field(location, "function_name_id")]
                               .strip('"')))
                # The printed parent id is one more than the parent's label (0: none).
                frame = str(int(field(row, "parent_frame_id")) - 1)
            return frames

        # Every instruction: (name, opcode, called computation, JAX primitive, frame id,
        # JAX's full op name).
        instruction = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\((.*)$")
        computations: dict[str, list[tuple[str, str, str, str, str, str]]] = {}
        for header, body in re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)\n\}", text,
                                       re.M | re.S):
            rows = computations.setdefault(header, [])
            for line in body.splitlines():
                found = instruction.match(line)
                if not found:
                    continue
                name, opcode, rest = found.groups()
                calls = re.search(r"calls=%([\w.-]+)", rest)
                op_name = re.search(r'op_name="([^"]*)"', rest)
                frame = re.search(r"stack_frame_id=(\d+)", rest)
                rows.append((name, opcode, calls.group(1) if calls else "",
                             op_name.group(1).rsplit("/", 1)[-1] if op_name else opcode,
                             frame.group(1) if frame else "",
                             op_name.group(1) if op_name else ""))
        for rows in computations.values():
            for name, opcode, calls, primitive, frame, full_name in rows:
                # A fusion is named by what it computes: the heavy ops inside it, and the
                # stack of its first dot (else of its first heavy op, else its own).
                inside = [row for row in computations.get(calls, []) if row[1] in HEAVY_OPS]
                inside.sort(key=lambda row: row[1] != "dot")
                if inside:
                    primitive = "+".join(dict.fromkeys(row[1] for row in inside))
                    frame = inside[0][4] or frame
                ops[(module, name)] = (stack(frame) if frame else [], primitive, full_name)
    return ops


def xla_kernel_events(trace_dir: str) -> list[tuple[str, str, float]]:
    """(HLO module, HLO op, seconds) of every kernel XLA:CPU ran in the jax.profiler
    perfetto trace written under `trace_dir`, which is then removed. Control flow (while,
    conditional, call) is left out: it only waits for the kernels it runs."""
    trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz",
                                          recursive=True)[0]))
    shutil.rmtree(trace_dir, ignore_errors=True)
    kernels = []
    for event in trace["traceEvents"]:
        args = event.get("args", {})
        op, module = args.get("hlo_op"), args.get("hlo_module")
        if event.get("ph") != "X" or op is None or re.match(r"(while|cond|call)", op):
            continue
        kernels.append((module, op, event["dur"] / 1e6))
    return kernels


PYTHON_FRAME = re.compile(r"(.*)\((\d+)\): (.*)")   # how torch.profiler names a Python call


def torch_op_events(prof) -> list[tuple[object, list[tuple[str, str]], list[str]]]:
    """(event, Python frames `[(file, function)]`, every parent's name) of each op a
    torch.profiler session saw, parents innermost first. Python functions themselves are
    left out: the ops under them carry the time."""
    ops = []
    for event in prof.events():
        if PYTHON_FRAME.match(event.name) or event.name.startswith("<"):
            continue
        frames, parents, parent = [], [], event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            found = PYTHON_FRAME.match(parent.name)
            if found:
                frames.append((found.group(1), found.group(3)))
            parent = parent.cpu_parent
        ops.append((event, frames, parents))
    return ops


def profile_section(sizes: dict, dump: str | None) -> None:
    import jax
    import torch

    from soma_models.v1.screening import Screener

    paths, samples, targets = _screening_inputs(sizes)
    named = [(str(i), sample) for i, sample in enumerate(samples[:sizes["groups"] * 2])]
    screeners = {name: Screener(paths, targets, framework=name, seed=0)
                 for name in ("flax", "torch")}
    for screener in screeners.values():
        list(screener.screen(named))                     # compile, warm up, load weights
    trace_dir = tempfile.mkdtemp(prefix="soma-bench-flax-trace-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        list(screeners["flax"].screen(named))
    flax_wall = time.perf_counter() - start
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                with_stack=True) as prof:
        list(screeners["torch"].screen(named))
    torch_wall = time.perf_counter() - start

    stacks = _hlo_op_stacks(dump) if dump else {}
    flax_rows: Counter = Counter()
    flax_shares: Counter = Counter()
    for module, op, seconds in xla_kernel_events(trace_dir):
        frames, primitive, _ = stacks.get((module, op), ([], op, ""))
        kind = "dot (YNNPACK)" if op.startswith("ynn_fusion") else op.split(".")[0]
        flax_rows[_label(frames, f"{primitive} [{kind}]")] += seconds
        flax_shares[_share(frames)] += seconds
    torch_rows: Counter = Counter()
    torch_shares: Counter = Counter()
    for event, frames, _ in torch_op_events(prof):
        torch_rows[_label(frames, event.name)] += event.self_cpu_time_total / 1e6
        torch_shares[_share(frames)] += event.self_cpu_time_total / 1e6

    print(f"\n== profile: one screening pass over {len(named)} samples, 3 "
          f"`{sizes['screen_preset']}` models, each backend under its profiler ==")
    print(f"wall: flax {flax_wall:.2f} s, torch {torch_wall:.2f} s (profilers on); kernel "
          f"time: XLA thunks {sum(flax_rows.values()):.2f} s, torch ops (self) "
          f"{sum(torch_rows.values()):.2f} s")
    for name, rows, what in (("XLA:CPU", flax_rows, "primitive [fusion]"),
                             ("torch", torch_rows, "op")):
        total = sum(rows.values()) or 1.0
        print(f"\n{name}: top kernels by time (innermost function of ours < innermost "
              f"function: {what})")
        for label, seconds in rows.most_common(12):
            print(f"  {seconds:7.3f} s {100 * seconds / total:5.1f}%  {label}")
    print("\nsplit by part of the pass   flax s  share   torch s  share   flax / torch time")
    for part in ("encoder layers", "SIGReg", "predictor", "cross-entropy",
                 "embedding, final norm, other"):
        f, t = flax_shares[part], torch_shares[part]
        print(f"  {part:<28} {f:6.2f} {100 * f / sum(flax_shares.values()):5.1f}%  "
              f"{t:7.2f} {100 * t / sum(torch_shares.values()):5.1f}%   "
              f"{f / t if t else float('nan'):5.2f}x")


def kernels_section(sizes: dict) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from flax import nnx

    from soma_models.v1.configs import V1_LAYER_NORM_EPS, SIGRegConfig, preset
    from soma_models.v1.flax.modules import sig_reg as flax_sig_reg
    from soma_models.v1.flax.modules.layer import layer_norm
    from soma_models.v1.torch.modules import sig_reg as torch_sig_reg

    rng = np.random.default_rng(0)
    angles = (3 * rng.standard_normal((4096, 256))).astype(np.float32)
    dim = preset(sizes["screen_preset"]).embedding_dim
    reps = rng.standard_normal((4, 1024, dim)).astype(np.float32)
    noise = rng.standard_normal((dim, 256)).astype(np.float32)
    config = SIGRegConfig(slices=256)
    xla_cos = jax.jit(jnp.cos)
    j_angles, j_reps, j_noise = (jnp.asarray(a) for a in (angles, reps, noise))
    # The model's LayerNorm (nnx.LayerNorm as `layer.layer_norm` builds it) over 16 rows.
    norm_input = rng.standard_normal((16, 1024, dim)).astype(np.float32)
    graphdef, norm_state = nnx.split(layer_norm(dim, nnx.Rngs(0)))
    xla_norm = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    j_norm_input, t_norm_input = jnp.asarray(norm_input), torch.from_numpy(norm_input)
    t_scale, t_bias = torch.ones(dim), torch.zeros(dim)

    def compiled_sig_reg():
        return jax.jit(lambda x, n: flax_sig_reg.sig_reg_position_values(x, n, config)
                       ).lower(j_reps, j_noise).compile()

    # The same SIGReg compiled with XLA's own sin and cos (what it used before sin_cos):
    # the module's name swapped while that one is traced. JAX caches the traced point
    # step by function, so its caches are cleared around the swap.
    xla_sig_reg = compiled_sig_reg()
    ours = flax_sig_reg.sin_cos
    jax.clear_caches()
    flax_sig_reg.sin_cos = lambda x: (jnp.sin(x), jnp.cos(x))
    try:
        xla_trig_sig_reg = compiled_sig_reg()
    finally:
        flax_sig_reg.sin_cos = ours
        jax.clear_caches()
    t_angles, t_reps, t_noise = (torch.from_numpy(a) for a in (angles, reps, noise))
    work = {
        ("cos [4096, 256]", "xla"): lambda: jax.block_until_ready(xla_cos(j_angles)),
        ("cos [4096, 256]", "torch"): lambda: torch.cos(t_angles),
        ("LayerNorm [16, 1024]", "xla"):
            lambda: jax.block_until_ready(xla_norm(norm_state, j_norm_input)),
        ("LayerNorm [16, 1024]", "torch"):
            lambda: torch.nn.functional.layer_norm(t_norm_input, (dim,), t_scale, t_bias,
                                                   V1_LAYER_NORM_EPS),
        ("SIGReg values [4, 1024]", "xla"):
            lambda: jax.block_until_ready(xla_sig_reg(j_reps, j_noise)),
        ("SIGReg values, XLA sin/cos", "xla"):
            lambda: jax.block_until_ready(xla_trig_sig_reg(j_reps, j_noise)),
        ("SIGReg values, XLA sin/cos", "torch"):
            lambda: torch_sig_reg.sig_reg_position_values(t_reps, t_noise, config),
        ("SIGReg values [4, 1024]", "torch"):
            lambda: torch_sig_reg.sig_reg_position_values(t_reps, t_noise, config),
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in work}
    for fn in work.values():
        fn()                                                           # compile / warm up
    for _ in range(5):
        for key, fn in work.items():
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            times[key].append(time.perf_counter() - start)
    print(f"\n== kernels: XLA ({jax.default_backend()}) against torch, best of 5 alternated ==")
    for what in dict.fromkeys(w for w, _ in work):
        xla, pt = min(times[(what, "xla")]), min(times[(what, "torch")])
        print(f"{what:<26} xla {xla * 1e3:8.1f} ms  torch {pt * 1e3:8.1f} ms  "
              f"torch / xla speed {xla / pt:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--sections", default="step,screen,kernels,precision",
                        help="comma-separated: step, screen, kernels, profile, precision")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    sections = set(args.sections.split(","))
    dump = None
    if "profile" in sections:
        # Before JAX starts: XLA writes the screening modules it compiles, with the Python
        # stack of every op, so that the profile can name each fusion.
        dump = tempfile.mkdtemp(prefix="soma-bench-flax-hlo-")
        atexit.register(shutil.rmtree, dump, ignore_errors=True)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                                   f" --xla_dump_hlo_module_re={PROFILED_MODULES}").strip()
    import jax
    import torch

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax "
          f"{jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores")
    if "step" in sections:
        step_section(sizes)
    if "screen" in sections:
        screen_section(sizes)
    if "kernels" in sections:
        kernels_section(sizes)
    if "profile" in sections:
        profile_section(sizes, dump)
    if "precision" in sections:
        precision_section(sizes)


if __name__ == "__main__":
    main()
