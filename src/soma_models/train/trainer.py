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

Sequence-length curriculum. The chain scores sequences of its protocol revision's
`max_seq_len` (1024 bytes under "0.1.7", 8192 under "0.1.1"); a small model trained only
on short ones attends poorly over long contexts. `final_seq_len` / `final_steps`
make the last `final_steps` steps use `final_seq_len`-long chunks, with the batch cut
to keep the tokens per step (`batch_size * seq_len / final_seq_len` sequences, one per
micro-batch). Short steps are cheap and learn fast; the final ones teach long contexts.

Run management. A run owns its folder (`run_folder.RunLock`) while it runs; it refuses a
folder holding another run unless resuming it (`resume`, every setting that decides the
weights as the checkpoint has it) or replacing it (`overwrite`); it stops before an
optimizer step whose loss or gradient norm is not finite, and never saves non-finite
weights; SIGTERM and SIGINT stop it with an exception, so no half-written checkpoint
remains. `protocol` picks the revision the exact score (and the SIGReg slices default)
follows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from soma_models.atomic import clean_stale
from soma_models.train import checkpoint as ckpt
from soma_models.train import distributed as distrib
from soma_models.train import options
from soma_models.train.data import (
    SPLITS,
    ChunkStream,
    ChunkTable,
    DataError,
    join_documents,
    read_documents,
    split_documents,
)
from soma_models.train.errors import NonFiniteError, TrainConfigError, TrainError
from soma_models.train.metrics import MetricsLog, exact_score, heldout_cross_entropy, read_metrics
from soma_models.train.plot import MISSING_MATPLOTLIB, plot_losses
from soma_models.train.run_folder import (
    RunFolderError,
    RunLock,
    clear_run,
    existing_entries,
    terminate_raises,
)
from soma_models.train.schedule import learning_rate
from soma_models.v1.configs import (
    V1_SIG_REG_COEFFICIENT,
    ModelConfig,
    SIGRegConfig,
    preset,
)
from soma_models.v1.contract import ScoringContract
from soma_models.v1.revisions import Revision, resolve
from soma_models.v1.torch import train_step as step_lib
from soma_models.v1.torch.modules import Model, SIGReg

SIZE_FIELDS = ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim")

#: Settings `--resume` may change: they decide where and how a run is watched, saved and
#: scheduled on hardware, not the weights it reaches (micro-batch size, process count and
#: compilation change float summation order only; activation checkpointing nothing). Every
#: other setting must match the checkpoint's; the model sizes are compared through the model
#: config, the data through its fingerprint, and `init_from` only matters before the first
#: step.
RESUME_MAY_CHANGE = frozenset({
    "data", "out_dir", "resume", "overwrite", "protocol", "init_from", "config", "dropout",
    *SIZE_FIELDS, "micro_batch_size", "eval_every", "eval_batch_size", "score_every",
    "score_seed", "score_seq_len", "score_batch_size", "checkpoint_every",
    "keep_checkpoints", "max_minutes", "progress", "plot", "device", "threads", "parallel",
    "activation_checkpointing", "compile"})


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
    sig_reg_slices: int | None = None    # None: the protocol revision's (256 or 1024)
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
    score_seq_len: int | None = None     # None: the revision's max_seq_len (1024 or 8192)
    score_batch_size: int | None = None  # None: the revision's batch size (16 or 32)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False                 # continue the run in out_dir from its checkpoint
    overwrite: bool = False              # replace a run already in out_dir
    protocol: str | None = None          # V1 revision scored against (None: the default)
    max_minutes: float | None = None     # stop early (and checkpoint) after this long
    progress: bool = True
    plot: bool = True
    # --- hardware ---
    device: str | None = None
    threads: int | None = None           # torch CPU threads (None: torch's default)
    parallel: str | None = None          # None/"ddp" or "fsdp" (under torchrun)

    def revision(self) -> Revision:
        """The protocol revision: `protocol`, else SOMA_MODELS_PROTOCOL, else "0.1.7"."""
        return resolve(self.protocol)

    def resolved(self) -> TrainConfig:
        """A copy with the revision's defaults filled in (what a run records)."""
        revision = self.revision()
        return dataclasses.replace(
            self, protocol=revision.name,
            sig_reg_slices=(revision.sig_reg_slices if self.sig_reg_slices is None
                            else self.sig_reg_slices),
            score_seq_len=self.score_seq_len or revision.max_seq_len,
            score_batch_size=self.score_batch_size or revision.batch_size)

    def model_config(self) -> ModelConfig:
        base = preset(self.config, self.protocol)
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
    protocol: str = ""  # the revision the score was computed under


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
        raise TrainConfigError(message)


class Trainer:
    """One training run. `Trainer(cfg).run()` trains, checkpoints, scores, plots."""

    def __init__(self, cfg: TrainConfig, ctx: distrib.DistContext | None = None):
        try:
            self.revision = cfg.revision()
        except ValueError as exc:  # the argument's, or SOMA_MODELS_PROTOCOL's (it says so)
            raise TrainConfigError(f"--protocol: {exc}" if cfg.protocol is not None
                                   else str(exc)) from None
        self.cfg = cfg = cfg.resolved()
        self.out_dir = Path(cfg.out_dir)
        self._lock: RunLock | None = None
        self._created_out_dir = False
        self._validate_settings()
        self.ctx = ctx or distrib.init_distributed(cfg.device)
        self._validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._claim_out_dir()
        try:
            self.model_config = cfg.model_config()
            self.model_config.require_contract_vocab()
            self._setup_data()
            self._setup_model()
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.tokens = 0  # training positions processed (PAD included)
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")

    # ------------------------------------------------------------ run folder
    def _claim_out_dir(self) -> None:
        """Lock `out_dir` (rank 0) and check that this run may write there: a folder that
        holds a run needs --resume or --overwrite, and --resume needs a checkpoint."""
        failure: Exception | None = None
        if self.ctx.is_main:
            try:
                self._claim_out_dir_main()
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it, then raise
                failure = exc
        message = distrib.broadcast_object(self.ctx, None if failure is None else str(failure))
        if failure is not None:
            self.close()
            raise failure
        if message is not None:
            raise TrainError(message)

    def _claim_out_dir_main(self) -> None:
        cfg, out = self.cfg, self.out_dir
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out}: exists and is not a folder")
        self._created_out_dir = not out.exists()
        self._lock = RunLock(out).acquire()
        try:
            present = existing_entries(out)
            if cfg.resume and not ckpt.has_checkpoint(self.checkpoint_root):
                hint = (" (it holds an unfinished run: --overwrite starts over)" if present
                        else "")
                raise RunFolderError(f"--resume: no checkpoint to resume from in "
                                     f"{self.checkpoint_root}{hint}")
            if present and not cfg.resume and not cfg.overwrite:
                raise RunFolderError(
                    f"--out {out} already holds a run ({', '.join(present)}); continue it "
                    f"with --resume, replace it with --overwrite, or choose another --out")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (and remove it if this run created it and left it empty)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._created_out_dir:
                with contextlib.suppress(OSError):
                    self.out_dir.rmdir()  # only succeeds if nothing was written

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tidy_out_dir(self) -> None:
        """Rank 0, lock held: replace an old run (--overwrite) and remove the temporaries
        that killed writers left (`atomic.staging` also does so on every write)."""
        if self.cfg.overwrite:
            clear_run(self.out_dir)
        clean_stale(self.out_dir)
        if self.checkpoint_root.is_dir():
            clean_stale(self.checkpoint_root)

    # ------------------------------------------------------------------ setup
    def _validate_settings(self) -> None:
        """Every setting on its own, and those that exclude each other: before anything."""
        cfg = self.cfg
        for name in options.RULES:
            options.check(name, getattr(cfg, name))
        _check(cfg.split in SPLITS, f"unknown split {cfg.split!r}; choose one of {SPLITS}")
        _check(cfg.parallel in (None, *distrib.PARALLEL_MODES),
               f"unknown --parallel {cfg.parallel!r}; choose ddp or fsdp")
        _check(not (cfg.resume and cfg.overwrite),
               "--resume and --overwrite exclude each other: continue the run, or replace it")

    def _validate(self) -> None:
        """The batch layout for this number of processes."""
        cfg, world = self.cfg, self.ctx.world_size
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

    def _require_finite_weights(self, plain: Model | None) -> None:
        """Refuse to save weights holding NaN/Inf (checked on rank 0, agreed by all)."""
        bad = None
        if self.ctx.is_main:
            bad = [name for name, p in plain.named_parameters()
                   if not bool(torch.isfinite(p).all())]
        bad = distrib.broadcast_object(self.ctx, bad)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteError(
                f"step {self.step}: the weights hold NaN or Inf ({shown}); training stopped "
                f"without saving them. {self._last_good()}")

    def _last_good(self) -> str:
        """Where the run stands on disk, for an error message."""
        try:
            folder = ckpt.find_checkpoint(self.checkpoint_root)
        except ckpt.CheckpointError:
            return ("No checkpoint was written before this step; lower --lr (or check the "
                    "data) and start again with --overwrite")
        return (f"The last good checkpoint, {folder}, is unchanged; lower --lr and start a "
                f"new run, e.g. with --init-from {folder / ckpt.MODEL_FILE}")

    def save_checkpoint(self) -> None:
        plain = self._plain_model()
        self._require_finite_weights(plain)
        optim = distrib.full_optimizer_state(self.module, self.optimizer, self.cfg.parallel,
                                             self.param_names)
        if self.ctx.is_main:
            tensors = {f"optimizer.{k}": v.numpy() for k, v in optim.items()}
            rng_tensors, rng_state = ckpt.capture_rng()
            tensors.update(rng_tensors)
            state = {
                "step": self.step,
                "data_position": [phase.stream.position for phase in self.phases],
                "tokens": self.tokens,
                "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "corpus": self.corpus,
                "world_size": self.ctx.world_size,
                "rng": rng_state,
            }
            ckpt.save_checkpoint(self.checkpoint_root, self.step, model_writer=plain.save,
                                 tensors=tensors, state=state,
                                 keep_last=self.cfg.keep_checkpoints)
        distrib.barrier(self.ctx)

    def resume(self) -> None:
        """Continue from the newest checkpoint under `out_dir`; refuses (one line) a missing
        checkpoint and any setting that would make the run differ from the checkpoint's."""
        root = self.checkpoint_root
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
        saved_cfg = state.get("train_config", {})
        changed = [f"{options.option_name(name)} {value!r} (checkpoint: {saved_cfg[name]!r})"
                   for name, value in self.cfg.to_dict().items()
                   if name not in RESUME_MAY_CHANGE and name in saved_cfg
                   and saved_cfg[name] != value]
        if changed:
            raise TrainError(f"{folder}: --resume with settings that change the run: "
                             f"{', '.join(changed)}; keep them as the checkpoint has them, or "
                             f"start a new run (another --out, or --overwrite)")
        if state.get("corpus", {}).get("fingerprint") != self.corpus["fingerprint"]:
            raise TrainError(f"{folder}: the training data differs from the checkpoint's "
                             f"(files or sizes changed); resume with the same data, or start "
                             f"a new run (another --out, or --overwrite)")
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
        ckpt.restore_rng(tensors, state["rng"])
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
        loss_mean, ce_sum_all, tokens_all = distrib.all_reduce_mean(
            ctx, [loss_total / phase.accumulation, ce_total, float(token_total)])
        grad_norm = step_lib.apply_update(
            self.optimizer, distrib.unwrap(self.module).parameters(),
            cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
            before_step=lambda norm: self._check_finite(loss_mean, norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += phase.batch_size * phase.seq_len
        return {"loss": loss_mean, "train_ce": ce_sum_all / max(tokens_all, 1.0),
                "lr": lr, "grad_norm": grad_norm, "seq_len": phase.seq_len}

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stop before an optimizer step that would write NaN/Inf into the weights. The loss
        is the all-reduced one and the norm the global one, so every process agrees."""
        bad = [f"{what} {value}" for what, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        if bad:
            if self.ctx.is_main:
                self.log.write(kind="stopped", step=self.step + 1, reason="non-finite",
                               **{k: str(v) for k, v in (("loss", loss), ("grad_norm", grad_norm))})
            raise NonFiniteError(
                f"step {self.step + 1}: non-finite {' and '.join(bad)}; training stopped before "
                f"the optimizer step (no weights updated or saved). {self._last_good()}")

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
                                     contract=ScoringContract.of(
                                         self.revision, max_seq_len=self.score_seq_len,
                                         batch_size=cfg.score_batch_size))
                out["score"] = float(result.loss)
        distrib.barrier(self.ctx)
        return out

    @property
    def score_seq_len(self) -> int:
        return self.cfg.score_seq_len  # resolved: the revision's max_seq_len by default

    def run(self) -> TrainResult:
        """Train to `cfg.steps` (or `max_minutes`), then release the run folder. SIGTERM and
        SIGINT stop it with an exception that removes any half-written checkpoint."""
        try:
            with terminate_raises():
                return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self._tidy_out_dir()
        distrib.barrier(ctx)
        if cfg.resume:
            self.resume()
        if ctx.is_main:
            ckpt.write_json(self.out_dir / "run.json", {
                "protocol": self.revision.name,
                "train_config": cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "corpus": self.corpus, "world_size": ctx.world_size,
                "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation})
        start_step, start_tokens, started = self.step, self.tokens, time.perf_counter()
        bar = None
        if ctx.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        try:
            evals = self._loop(bar, start_tokens, started)
        finally:
            if bar is not None:
                bar.close()
        if self.step == start_step:  # resumed a finished run: still report where it is
            evals = self.evaluate(with_score=True)
        seconds = time.perf_counter() - started
        speed = (self.tokens - start_tokens) / max(seconds, 1e-9)
        weights = self.out_dir / "model.safetensors"
        plot_path = None
        plain = self._plain_model()
        self._require_finite_weights(plain)
        if ctx.is_main:
            plain.save(weights)
            records = read_metrics(self.log.path) if self.log.path.exists() else []
            if cfg.plot:
                lengths = " then ".join(str(p.seq_len) for p in self.phases)
                plot_path = plot_losses(records, self.out_dir / "loss.png",
                                        title=f"{cfg.config} model, sequences of {lengths} "
                                              "bytes")
                if plot_path is None:
                    print(MISSING_MATPLOTLIB, file=sys.stderr)
            summary = {"step": self.step, "tokens_per_s": speed, "seconds": seconds,
                       "protocol": self.revision.name, "score_seq_len": self.score_seq_len,
                       "score_batch_size": cfg.score_batch_size,
                       "score_sig_reg_slices": self.revision.sig_reg_slices, **evals}
            ckpt.write_json(self.out_dir / "summary.json", summary)
        distrib.barrier(ctx)
        return TrainResult(self.out_dir, weights, self.log.path, plot_path, self.step,
                           evals.get("val_ce"), evals.get("score"), self.score_seq_len,
                           speed, seconds, self.revision.name)

    def _loop(self, bar, start_tokens: int, started: float) -> dict[str, float]:
        """The steps; returns the last evaluation."""
        cfg, ctx = self.cfg, self.ctx
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
                    scored_under = {"protocol": self.revision.name} if "score" in evals else {}
                    self.log.write(kind="eval", step=self.step,
                                   tokens=self.tokens, **evals, **scored_under)
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
        return evals


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` (joins a torchrun process group when launched under one)."""
    ctx = distrib.init_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx).run()
    finally:
        distrib.shutdown(ctx)


def describe(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1)


__all__ = ["NonFiniteError", "TrainConfig", "TrainConfigError", "TrainError", "TrainResult",
           "Trainer", "train"]
