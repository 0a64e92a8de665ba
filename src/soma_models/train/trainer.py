"""The training loop: data -> AdamW on the on-chain loss -> checkpoints, metrics, score.

The objective is what the chain scores (SPEC §6): per micro-batch,
`cross_entropy_sum / (rows * seq_len) + coefficient * SIGReg(representations, noise)`,
with fresh Gaussian SIGReg noise for every micro-batch. Each step is the library's own
(`soma_models.v1.torch.train_step`: `backward` per micro-batch, then `apply_update`), on
the loss of `soma_models.v1.torch.loss`, with its optimizer groups and bf16 policy.

Determinism. Every source of randomness is a function of `(seed, step, micro-batch)`:
the chunk order (one seeded permutation per epoch), the dropout masks (torch's RNG is
re-seeded before each micro-batch) and the SIGReg noise (its own seeded generator).
Hence

* an interrupted run resumed from a checkpoint ends with the same weights as an
  uninterrupted one (the checkpoint also stores the RNG states and data position);
* N processes with the same *global* batch compute the same micro-batches as one
  process would, only spread out, so they reach the same weights up to float
  summation order.

Global batch = `micro_batch_size * accumulation * world_size` chunks. Global micro-batch
`m` of a step goes to rank `m % world_size`.

Sequence-length curriculum. The chain scores 8192-byte sequences; a small model trained
only on short ones attends poorly over long contexts. `final_seq_len` / `final_steps`
make the last `final_steps` steps use `final_seq_len`-long chunks, with the batch cut
to keep the tokens per step (`batch_size * seq_len / final_seq_len` sequences, one per
micro-batch). Short steps are cheap and learn fast; the final ones teach long contexts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soma_models.train import checkpoint as ckpt
from soma_models.train import distributed as distrib
from soma_models.train.data import (
    SPLITS,
    ChunkStream,
    ChunkTable,
    DataError,
    join_documents,
    read_documents,
    split_documents,
)
from soma_models.train.metrics import MetricsLog, exact_score, heldout_cross_entropy, read_metrics
from soma_models.train.plot import MISSING_MATPLOTLIB, plot_losses
from soma_models.train.schedule import learning_rate
from soma_models.v1.configs import (
    V1_BATCH_SIZE,
    V1_MAX_SEQ_LEN,
    V1_SIG_REG_COEFFICIENT,
    V1_SIG_REG_SLICES,
    ModelConfig,
    SIGRegConfig,
    preset,
)
from soma_models.v1.torch import train_step as step_lib
from soma_models.v1.torch.modules import Model, SIGReg

SIZE_FIELDS = ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim")


class TrainError(ValueError):
    """A training run cannot start or continue; the message is one line naming the problem."""


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults suit a small model on one machine."""

    data: list[str] = field(default_factory=list)
    out_dir: str = "runs/soma"
    # --- model ---
    config: str = "tiny"                 # a preset of soma_models.v1.configs.PRESETS
    embedding_dim: int | None = None     # explicit sizes override the preset's
    num_layers: int | None = None
    num_heads: int | None = None
    pwff_hidden_dim: int | None = None
    dropout: float = 0.0
    init_from: str | None = None         # start from these weights instead of from scratch
    # --- data ---
    seq_len: int = 512
    final_seq_len: int | None = None     # curriculum: the last `final_steps` use this length
    final_steps: int = 0
    val_fraction: float = 0.1
    split: str = "bytes"
    shuffle: bool = True
    # --- optimisation ---
    steps: int = 1000
    batch_size: int = 16                 # global batch, in chunks of seq_len
    micro_batch_size: int | None = None  # per process; None = batch_size / world_size
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    sig_reg_coefficient: float = V1_SIG_REG_COEFFICIENT
    sig_reg_slices: int = V1_SIG_REG_SLICES
    sig_reg_positions: int | None = None  # SIGReg on a random subset of positions (unbiased)
    bf16: bool = False                   # bfloat16 autocast (train_step.check_bf16_autocast)
    activation_checkpointing: bool = False  # speed/memory options: train_step.prepare_model
    compile: bool = False
    seed: int = 0
    # --- watching and saving ---
    eval_every: int = 100
    eval_batch_size: int = 8
    score_every: int = 0                 # 0: score only at the end
    score_seed: int = 0
    score_seq_len: int | None = None     # None: the chain's 8192
    score_batch_size: int = V1_BATCH_SIZE
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    max_minutes: float | None = None     # stop early (and checkpoint) after this long
    progress: bool = True
    plot: bool = True
    # --- hardware ---
    device: str | None = None
    threads: int | None = None           # torch CPU threads (None: torch's default)
    parallel: str | None = None          # None/"ddp" or "fsdp" (under torchrun)

    def model_config(self) -> ModelConfig:
        base = preset(self.config)
        sizes = {k: getattr(self, k) for k in SIZE_FIELDS if getattr(self, k) is not None}
        return dataclasses.replace(base, dropout_rate=self.dropout, **sizes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out_dir: Path
    weights: Path
    metrics: Path
    plot: Path | None
    step: int
    val_ce: float | None
    score: float | None
    score_seq_len: int
    tokens_per_second: float
    seconds: float


@dataclass
class Phase:
    """Sequence length and batch layout of a run's steps (one, or two with a curriculum)."""

    seq_len: int
    batch_size: int
    micro_batch_size: int
    accumulation: int
    table: ChunkTable
    stream: ChunkStream


def _micro_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """A 63-bit seed for (run seed, step, global micro-batch, purpose)."""
    state = np.random.SeedSequence([seed, step, micro, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _corpus_fingerprint(documents) -> str:
    h = hashlib.blake2b(digest_size=16)
    for doc in documents:
        h.update(doc.name.encode("utf-8") + b"\0" + len(doc.data).to_bytes(8, "little"))
    return h.hexdigest()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TrainError(message)


class Trainer:
    """One training run. `Trainer(cfg).run()` trains, checkpoints, scores, plots."""

    def __init__(self, cfg: TrainConfig, ctx: distrib.DistContext | None = None):
        self.cfg = cfg
        self.ctx = ctx or distrib.init_distributed(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out_dir = Path(cfg.out_dir)
        self._validate()
        self.model_config = cfg.model_config()
        self.model_config.require_contract_vocab()
        self._setup_data()
        self._setup_model()
        self.step = 0
        self.tokens = 0  # training positions processed (PAD included)
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")

    # ------------------------------------------------------------------ setup
    def _validate(self) -> None:
        cfg, world = self.cfg, self.ctx.world_size
        _check(cfg.split in SPLITS, f"unknown split {cfg.split!r}; choose one of {SPLITS}")
        for name in ("seq_len", "steps", "batch_size", "eval_batch_size", "score_batch_size",
                     "sig_reg_slices", "sig_reg_positions", "threads"):
            if getattr(cfg, name) is None:
                continue
            _check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, "
                                           f"got {getattr(cfg, name)}")
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
        _check(cfg.batch_size % (micro * world) == 0,
               f"batch size {cfg.batch_size} is not a multiple of micro-batch size {micro} x "
               f"{world} process(es)")
        self.micro_batch_size = micro
        self.accumulation = cfg.batch_size // (micro * world)
        if cfg.final_seq_len is not None and cfg.final_steps > 0:
            _check(0 < cfg.final_steps <= cfg.steps,
                   f"--final-steps must be in 1..--steps ({cfg.steps}), got {cfg.final_steps}")
            rows = cfg.batch_size * cfg.seq_len // cfg.final_seq_len
            _check(rows >= world and rows % world == 0,
                   f"--final-seq-len {cfg.final_seq_len} leaves {rows} sequence(s) per step "
                   f"(batch {cfg.batch_size} x seq-len {cfg.seq_len} / final length), not a "
                   f"positive multiple of {world} process(es)")
        _check(cfg.parallel in (None, *distrib.PARALLEL_MODES),
               f"unknown --parallel {cfg.parallel!r}; choose ddp or fsdp")
        _check(cfg.lr > 0 and cfg.grad_clip >= 0 and 0 <= cfg.min_lr_ratio <= 1,
               "need --lr > 0, --grad-clip >= 0 and 0 <= --min-lr-ratio <= 1")

    def _setup_data(self) -> None:
        cfg = self.cfg
        try:
            documents = read_documents(cfg.data)
            train_docs, val_docs = split_documents(documents, cfg.val_fraction, cfg.split)
        except DataError as exc:
            raise TrainError(str(exc)) from None
        self.train_table = ChunkTable(train_docs, cfg.seq_len)
        self.val_data = join_documents(val_docs)
        self.stream = ChunkStream(len(self.train_table), cfg.seed, cfg.shuffle)
        self.phases = [Phase(cfg.seq_len, cfg.batch_size, self.micro_batch_size,
                             self.accumulation, self.train_table, self.stream)]
        if cfg.final_seq_len is not None and cfg.final_steps > 0:
            rows = cfg.batch_size * cfg.seq_len // cfg.final_seq_len
            table = ChunkTable(train_docs, cfg.final_seq_len)
            self.phases.append(Phase(cfg.final_seq_len, rows, 1, rows // self.ctx.world_size,
                                     table, ChunkStream(len(table), cfg.seed + 1, cfg.shuffle)))
        self.corpus = {
            "files": len(documents), "train_files": len(train_docs), "val_files": len(val_docs),
            "train_bytes": self.train_table.num_bytes, "val_bytes": len(self.val_data),
            "train_chunks": len(self.train_table),
            "fingerprint": _corpus_fingerprint(train_docs),
        }

    def _setup_model(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.seed)
        model = Model(self.model_config)  # from-scratch init: Model.reset_parameters
        if cfg.init_from:
            try:
                source = Model.load(cfg.init_from, self.model_config)
            except (OSError, ValueError) as exc:
                raise TrainError(" ".join(str(exc).split())) from None
            model.load_state_dict(source.state_dict())
        model.to(ctx.device)
        step_lib.prepare_model(model, activation_checkpointing=cfg.activation_checkpointing,
                               compile=cfg.compile)
        self.param_names = [name for name, _ in model.named_parameters()]
        self.module = distrib.wrap(distrib.TrainingModule(model), cfg.parallel, ctx)
        self.sig_reg = SIGReg(SIGRegConfig(slices=cfg.sig_reg_slices,
                                           coefficient=cfg.sig_reg_coefficient))
        inner = distrib.unwrap(self.module).model
        # FSDP2's sharded parameters take the per-parameter loop; elsewhere the fused kernel.
        self.optimizer = step_lib.make_optimizer(
            inner, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
            eps=1e-8, implementation="loop" if cfg.parallel == "fsdp" else "auto")
        # Optimizer-state order (checkpoints name each parameter's state).
        by_id = {id(p): n for n, p in inner.named_parameters()}
        self.param_names = [by_id[id(p)] for group in self.optimizer.param_groups
                            for p in group["params"]]

    # ----------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def _plain_model(self) -> Model | None:
        """A plain, unsharded `Model` with the current weights (rank 0; collective under FSDP)."""
        if self.cfg.parallel != "fsdp":
            return distrib.unwrap(self.module).model if self.ctx.is_main else None
        state = distrib.full_model_state(self.module, "fsdp")
        if not self.ctx.is_main:
            return None
        with torch.device("meta"):
            plain = Model(self.model_config)
        plain.load_state_dict(state, assign=True)
        return plain

    def save_checkpoint(self) -> None:
        plain = self._plain_model()
        optim = distrib.full_optimizer_state(self.module, self.optimizer, self.cfg.parallel,
                                             self.param_names)
        if self.ctx.is_main:
            tensors = {f"optimizer.{k}": v.numpy() for k, v in optim.items()}
            tensors["rng.torch"] = torch.get_rng_state().numpy()
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda.{i}"] = s.numpy()
            np_state = np.random.get_state()
            py_version, py_internal, py_gauss = random.getstate()
            state = {
                "step": self.step,
                "data_position": [phase.stream.position for phase in self.phases],
                "tokens": self.tokens,
                "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "corpus": self.corpus,
                "world_size": self.ctx.world_size,
                "rng": {"python": [py_version, list(py_internal), py_gauss],
                        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])]},
            }
            ckpt.save_checkpoint(self.checkpoint_root, self.step, model_writer=plain.save,
                                 tensors=tensors, state=state,
                                 keep_last=self.cfg.keep_checkpoints)
        distrib.barrier(self.ctx)

    def resume(self) -> None:
        """Continue from the newest checkpoint under `out_dir` (nothing there: start fresh)."""
        root = self.checkpoint_root
        if not root.exists() or not any(root.iterdir()):
            return
        try:
            folder = ckpt.find_checkpoint(root)
            state, tensors = ckpt.read_checkpoint(folder)
        except ckpt.CheckpointError as exc:
            raise TrainError(str(exc)) from None
        saved = state.get("model_config", {})
        if saved != self.model_config.to_dict():
            diff = sorted(k for k in set(saved) | set(self.model_config.to_dict())
                          if saved.get(k) != self.model_config.to_dict().get(k))
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs requested "
                                f"{self.model_config.to_dict().get(k)!r}" for k in diff)
            raise TrainError(f"{folder}: model config does not match the checkpoint ({details})")
        for name in ("seq_len", "final_seq_len"):
            saved_value = state.get("train_config", {}).get(name)
            _check(saved_value == getattr(self.cfg, name),
                   f"{folder}: checkpoint was trained with --{name.replace('_', '-')} "
                   f"{saved_value}, not {getattr(self.cfg, name)}")
        _check(state.get("corpus", {}).get("fingerprint") == self.corpus["fingerprint"],
               f"{folder}: the training data differs from the checkpoint's (files or sizes "
               f"changed); resume with the same data, or start a new --out-dir")
        try:
            weights = Model.load(folder / ckpt.MODEL_FILE, self.model_config)
        except (OSError, ValueError) as exc:
            raise TrainError(" ".join(str(exc).split())) from None
        prefix = "optimizer."
        optim = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items()
                 if k.startswith(prefix)}
        distrib.load_full_state(self.module, self.optimizer, self.cfg.parallel,
                                self.param_names,
                                {k: v.to(self.ctx.device)
                                 for k, v in weights.state_dict().items()}, optim)
        self.step = int(state["step"])
        positions = state["data_position"]
        _check(len(positions) == len(self.phases),
               f"{folder}: checkpoint has {len(positions)} sequence-length phase(s), this run "
               f"{len(self.phases)}; keep --final-seq-len/--final-steps as they were")
        for phase, position in zip(self.phases, positions, strict=True):
            phase.stream.position = int(position)
        self.tokens = int(state["tokens"])
        torch.set_rng_state(torch.from_numpy(tensors["rng.torch"]))
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(torch.from_numpy(tensors[f"rng.cuda.{i}"]), i)
        py = state["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npy = state["rng"]["numpy"]
        np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
        if self.ctx.is_main:
            self.log.truncate_after(self.step)

    # -------------------------------------------------------------- training
    def phase(self, step: int) -> Phase:
        """The phase optimizer step `step` (0-based) belongs to."""
        if len(self.phases) > 1 and step >= self.cfg.steps - self.cfg.final_steps:
            return self.phases[1]
        return self.phases[0]

    def _micro_batch(self, table: ChunkTable, indices: np.ndarray, step: int, micro: int,
                     accumulation: int) -> tuple[float, float, int]:
        """Forward and backward of one micro-batch (`train_step.backward`, the library's
        step); returns (loss, ce_sum, predicted tokens)."""
        cfg, dev = self.cfg, self.ctx.device
        batch = table.rows(indices)
        tokens, targets, pos = step_lib.batch_tensors(batch, dev)
        # Dropout masks depend only on (seed, step, micro-batch): see the module docstring.
        torch.manual_seed(_micro_seed(cfg.seed, step, micro, 0))
        noise_gen = torch.Generator().manual_seed(_micro_seed(cfg.seed, step, micro, 1))
        noise = torch.randn(self.model_config.embedding_dim, cfg.sig_reg_slices,
                            generator=noise_gen).to(dev)
        rows = None
        positions = tokens.numel()
        if (cfg.sig_reg_coefficient > 0 and cfg.sig_reg_positions
                and cfg.sig_reg_positions < positions):
            # SIGReg on a uniform random subset of positions: an unbiased estimate at a
            # fraction of the cost (cos/sin of positions x slices x points dominates
            # small models' steps).
            rows = torch.randperm(positions, generator=noise_gen)[:cfg.sig_reg_positions]
            rows = rows.to(dev)
        terms = step_lib.backward(self.module, self.sig_reg, tokens, targets, pos,
                                  noise=noise, sig_reg_rows=rows, autocast_bf16=cfg.bf16,
                                  accumulation=accumulation)
        return float(terms.loss.detach()), float(terms.ce_sum.detach()), batch.num_data_tokens

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch."""
        cfg, ctx = self.cfg, self.ctx
        lr = learning_rate(self.step, peak=cfg.lr, warmup_steps=cfg.warmup_steps,
                           total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        phase = self.phase(self.step)
        indices = phase.stream.take(phase.batch_size)
        loss_total, ce_total, token_total = 0.0, 0.0, 0
        size = phase.micro_batch_size
        for a in range(phase.accumulation):
            micro = a * ctx.world_size + ctx.rank
            rows = indices[micro * size:(micro + 1) * size]
            last = a == phase.accumulation - 1
            sync = contextlib.nullcontext()
            if not last and isinstance(self.module, torch.nn.parallel.DistributedDataParallel):
                sync = self.module.no_sync()
            elif cfg.parallel == "fsdp":
                self.module.set_requires_gradient_sync(last)
            with sync:
                loss, ce_sum, tokens = self._micro_batch(phase.table, rows, self.step, micro,
                                                         phase.accumulation)
            loss_total += loss
            ce_total += ce_sum
            token_total += tokens
        grad_norm = step_lib.apply_update(
            self.optimizer, distrib.unwrap(self.module).parameters(),
            cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += phase.batch_size * phase.seq_len
        loss_mean, ce_sum_all, tokens_all = distrib.all_reduce_mean(
            ctx, [loss_total / phase.accumulation, ce_total, float(token_total)])
        return {"loss": loss_mean, "train_ce": ce_sum_all / max(tokens_all, 1.0),
                "lr": lr, "grad_norm": grad_norm, "seq_len": phase.seq_len}

    def evaluate(self, with_score: bool) -> dict[str, float]:
        """Held-out cross-entropy (and, if asked, the exact score) on rank 0."""
        cfg = self.cfg
        plain = self._plain_model()
        out: dict[str, float] = {}
        if self.ctx.is_main:
            # Held-out CE at every training length; `val_ce` is the last phase's length
            # (what the finished model is trained for).
            for phase in self.phases:
                out[f"val_ce_at_{phase.seq_len}"] = heldout_cross_entropy(
                    plain, self.val_data, phase.seq_len,
                    max(1, cfg.eval_batch_size * cfg.seq_len // phase.seq_len))
            out["val_ce"] = out[f"val_ce_at_{self.phases[-1].seq_len}"]
            if len(self.phases) == 1:
                del out[f"val_ce_at_{cfg.seq_len}"]
            if with_score:
                result = exact_score(plain, self.val_data, cfg.score_seed,
                                     max_seq_len=self.score_seq_len,
                                     batch_size=cfg.score_batch_size)
                out["score"] = float(result.loss)
        distrib.barrier(self.ctx)
        return out

    @property
    def score_seq_len(self) -> int:
        return self.cfg.score_seq_len or V1_MAX_SEQ_LEN

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and (self.out_dir / "metrics.jsonl").exists():
                (self.out_dir / "metrics.jsonl").unlink()
        distrib.barrier(ctx)
        if cfg.resume:
            self.resume()
        if ctx.is_main:
            ckpt.write_json(self.out_dir / "run.json", {
                "train_config": cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "corpus": self.corpus, "world_size": ctx.world_size,
                "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation})
        start_step, start_tokens, started = self.step, self.tokens, time.perf_counter()
        bar = None
        if ctx.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        last: dict[str, float] = {}
        evals: dict[str, float] = {}
        stopped_early = False
        while self.step < cfg.steps:
            last = self.train_step()
            elapsed = time.perf_counter() - started
            speed = (self.tokens - start_tokens) / max(elapsed, 1e-9)
            if ctx.is_main:
                self.log.write(kind="train", step=self.step,
                               tokens=self.tokens, tokens_per_s=round(speed, 1),
                               epoch=round(self.phase(self.step - 1).stream.epoch, 4), **last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['train_ce']:.3f}",
                                    tok_s=f"{speed:,.0f}")
            final = self.step == cfg.steps
            if cfg.max_minutes is not None:
                over = distrib.broadcast_object(ctx, elapsed > 60 * cfg.max_minutes)
                if over and not final:
                    stopped_early = final = True
            if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                scored = final or bool(cfg.score_every and self.step % cfg.score_every == 0)
                evals = self.evaluate(with_score=scored)
                if ctx.is_main:
                    self.log.write(kind="eval", step=self.step,
                                   tokens=self.tokens, **evals)
                    if bar is not None:
                        bar.write(f"step {self.step}: held-out CE {evals['val_ce']:.4f}"
                                  + "".join(f", at {k[len('val_ce_at_'):]} bytes {v:.4f}"
                                            for k, v in evals.items()
                                            if k.startswith("val_ce_at_"))
                                  + (f", exact score {evals['score']:.4f}"
                                     if "score" in evals else ""))
            if final or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self.save_checkpoint()
            if stopped_early:
                if bar is not None:
                    bar.write(f"stopping at step {self.step}: --max-minutes "
                              f"{cfg.max_minutes} reached")
                break
        if bar is not None:
            bar.close()
        if self.step == start_step:  # resumed a finished run: still report where it is
            evals = self.evaluate(with_score=True)
        seconds = time.perf_counter() - started
        speed = (self.tokens - start_tokens) / max(seconds, 1e-9)
        weights = self.out_dir / "model.safetensors"
        plot_path = None
        plain = self._plain_model()
        if ctx.is_main:
            plain.save(weights)
            records = read_metrics(self.log.path) if self.log.path.exists() else []
            if cfg.plot:
                plot_path = plot_losses(records, self.out_dir / "loss.png",
                                        title=f"{cfg.config} model, sequences of "
                                              f"{' then '.join(str(p.seq_len) for p in self.phases)}"
                                              f" bytes")
                if plot_path is None:
                    print(MISSING_MATPLOTLIB, file=sys.stderr)
            summary = {"step": self.step, "tokens_per_s": speed, "seconds": seconds,
                       "score_seq_len": self.score_seq_len, **evals}
            ckpt.write_json(self.out_dir / "summary.json", summary)
        distrib.barrier(ctx)
        return TrainResult(self.out_dir, weights, self.log.path, plot_path, self.step,
                           evals.get("val_ce"), evals.get("score"), self.score_seq_len,
                           speed, seconds)


def _plain(value):
    """NumPy scalars -> Python scalars for JSON."""
    return value.item() if hasattr(value, "item") else value


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` (joins a torchrun process group when launched under one)."""
    ctx = distrib.init_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx).run()
    finally:
        distrib.shutdown(ctx)


def describe(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1)


__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "train"]
