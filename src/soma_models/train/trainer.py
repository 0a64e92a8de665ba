"""The training loop: data -> AdamW on the on-chain loss -> checkpoints, metrics, score.

The objective is what the chain scores (SPEC §6): per micro-batch,
`cross_entropy_sum / (rows * seq_len) + coefficient * SIGReg(representations, noise)`,
with fresh Gaussian SIGReg noise for every micro-batch. Each step is the library's own
(`soma_models.v1.torch.train_step`: `backward` per micro-batch, then `apply_update`), on
the loss of `soma_models.v1.torch.loss`, with its optimizer groups and bf16 policy.

Determinism. Every source of randomness is a function of `(seed, step, micro-batch)`:
the chunk order (one seeded permutation per epoch), the dropout masks (torch's RNG is
re-seeded before each micro-batch; Flax's dropout streams restart from a key of their
own) and the SIGReg noise (its own seeded generator).
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

Run management. A run owns its folder (`run_folder.RunFolder`) while it runs; it refuses a
folder holding another run unless resuming it (`resume`, every setting that decides the
weights as the checkpoint has it) or replacing it (`overwrite`); it stops before an
optimizer step whose loss or gradient norm is not finite, and never saves non-finite
weights; SIGTERM and SIGINT stop it with an exception, so no half-written checkpoint
remains. `protocol` picks the revision the exact score (and the SIGReg slices default)
follows.

Components. The settings are `config.TrainConfig`'s; the run folder `run_folder`'s;
writing, pruning, the finiteness gate and the resume check `checkpoint`'s; evaluation,
the summary and the plot `metrics`'s; the chunking `data`'s. This module keeps setup, the
step and the loop, and is framework-free: the framework's half of a run is an engine
(the protocol `engine.Engine`; torch's is `torch_engine.TorchEngine`, Flax's
`flax_engine.FlaxEngine`, chosen by `cfg.framework`), which the trainer
drives through `engine.backward` / `engine.update` for a step and `engine.gather` once per
evaluation/save point. Another framework's engine plugs in as `Trainer(cfg, engine=...)`,
leaving the loop untouched.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soma_models.train import checkpoint as ckpt
from soma_models.train import config
from soma_models.train.config import TrainConfig
from soma_models.train.engine import Engine, MicroBatch
from soma_models.train.data import (
    ChunkStream,
    ChunkTable,
    DataError,
    open_training_data,
    step_share,
)
from soma_models.train.errors import NonFiniteError, TrainConfigError, TrainError
from soma_models.train.metrics import (
    MetricsLog,
    describe_evaluation,
    evaluate,
    report_compile,
    write_summary,
)
from soma_models.train.run_folder import RunFolder, terminate_raises
from soma_models.train.schedule import learning_rate
from soma_models.v1.contract import ScoringContract


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


@dataclass
class Snapshot:
    """The plain model at one evaluation/save point (rank 0's; None elsewhere), gathered
    once for all that the point does, and whether the finiteness gate has passed it."""

    model: Any
    checked: bool = False


def torch_engine(cfg: TrainConfig, ctx: Any = None) -> Engine:
    """The default engine (imported here, so that this module needs no framework)."""
    from soma_models.train.torch_engine import TorchEngine

    return TorchEngine(cfg.device, ctx)


def engine_for(cfg: TrainConfig, ctx: Any = None) -> Engine:
    """`cfg.framework`'s engine: torch's (on `ctx`, the torchrun process group) or Flax's."""
    if cfg.framework == "flax":
        from soma_models.train.flax_engine import FlaxEngine

        config.check_settings(cfg)  # torch-only options refused before JAX starts
        return FlaxEngine(cfg.device)
    return torch_engine(cfg, ctx)


class Trainer:
    """One training run. `Trainer(cfg).run()` trains, checkpoints, scores, plots.

    `engine` is the framework's half (default: `TorchEngine` on `ctx`, the torchrun
    process group); see the module docstring."""

    def __init__(self, cfg: TrainConfig, ctx: Any = None, *, engine: Engine | None = None):
        try:
            self.revision = cfg.revision()
        except ValueError as exc:  # the argument's, or SOMA_MODELS_PROTOCOL's (it says so)
            raise TrainConfigError(f"--protocol: {exc}" if cfg.protocol is not None
                                   else str(exc)) from None
        self.cfg = cfg = cfg.resolved()
        config.check_settings(cfg)
        self.contract = ScoringContract.of(self.revision, max_seq_len=cfg.score_seq_len,
                                           batch_size=cfg.score_batch_size)
        self.engine: Engine = engine or engine_for(cfg, ctx)
        layout = config.batch_layout(cfg, self.engine.world_size)
        self.micro_batch_size, self.accumulation = layout.micro_batch_size, layout.accumulation
        self.folder = RunFolder(cfg.out_dir)
        self.out_dir = self.folder.path
        self.folder.claim_for_all(self.engine, resume=cfg.resume, overwrite=cfg.overwrite)
        try:
            self.model_config = cfg.model_config()
            self.model_config.require_contract_vocab()
            self._setup_data()
            self.engine.build(cfg, self.model_config)
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.tokens = 0  # training positions processed (PAD included)
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")
        self._snapshot: Snapshot | None = None

    # ------------------------------------------------------------------ setup
    def close(self) -> None:
        """Release the run folder (and remove it if this run created it and left it empty)."""
        self.folder.release()

    def _setup_data(self) -> None:
        cfg = self.cfg
        # Memory-mapped documents (a prepared corpus or raw files): nothing is read here
        # but the index, and resident memory does not grow with the corpus.
        try:
            data = open_training_data(cfg.data, cfg.val_fraction, cfg.split)
            self.train_table = data.table(cfg.seq_len)
            self.val_data = data.split.heldout(cfg.val_max_bytes)
        except DataError as exc:
            raise TrainError(str(exc)) from None
        self.stream = ChunkStream(len(self.train_table), cfg.seed, cfg.shuffle)
        self.phases = [Phase(cfg.seq_len, cfg.batch_size, self.micro_batch_size,
                             self.accumulation, self.train_table, self.stream)]
        if cfg.final_seq_len is not None and cfg.final_steps > 0:
            rows = cfg.batch_size * cfg.seq_len // cfg.final_seq_len
            table = data.table(cfg.final_seq_len)
            self.phases.append(Phase(cfg.final_seq_len, rows, 1, rows // self.engine.world_size,
                                     table, ChunkStream(len(table), cfg.seed + 1, cfg.shuffle)))
        # The fingerprint names the documents (a corpus's shard hashes, or raw files' names
        # and sizes); the split settings are compared with the other settings on resume.
        self.corpus = {**data.describe(), "source": data.documents.name,
                       "val_bytes_evaluated": len(self.val_data),
                       "train_chunks": len(self.train_table)}

    @property
    def module(self) -> Any:
        """The engine's training module (wrapped for data parallelism, if any)."""
        return self.engine.module

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where the run stands besides the weights and optimizer: `step`, `tokens`, each
        phase's `data_position` (its stream's `state_dict`: position, size, seed: exact
        resumption), and the RNG states (`rng`, JSON-able, and `rng_tensors`,
        byte arrays). Rank 0's is what a checkpoint records."""
        rng_tensors, rng = self.engine.rng_state()
        return {"step": self.step, "tokens": self.tokens,
                "data_position": [phase.stream.state_dict() for phase in self.phases],
                "rng": rng, "rng_tensors": rng_tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned (one position per phase)."""
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        for phase, position in zip(self.phases, state["data_position"], strict=True):
            try:
                if isinstance(position, dict):  # the stream's state: position, size, seed
                    phase.stream.load_state_dict(position)
                else:  # checkpoints written before streams had a state: the position alone
                    phase.stream.position = int(position)
            except DataError as exc:
                raise TrainError(f"data position: {exc}") from None
        self.engine.set_rng_state(state["rng_tensors"], state["rng"])
        self._snapshot = None

    def _record(self) -> dict[str, Any]:
        """What `run.json` and every checkpoint record of the run, for resuming checks."""
        return {"model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
                "corpus": self.corpus, "world_size": self.engine.world_size}

    def save_checkpoint(self) -> None:
        """Checkpoint the current step (collective): the weights (through the finiteness
        gate), the optimizer state, `state_dict()` and the run's record."""
        snapshot = self._plain()
        self._require_finite(snapshot)
        optimizer = self.engine.optimizer_state()
        if self.engine.is_main:
            ckpt.save_run(self.folder.checkpoints, self.step,
                          model_writer=lambda path: self.engine.save_weights(snapshot.model, path),
                          optimizer=optimizer, run_state=self.state_dict(), record=self._record(),
                          keep_last=self.cfg.keep_checkpoints)
        self.engine.barrier()

    def resume(self) -> None:
        """Continue from the newest checkpoint under `out_dir`; refuses (one line) a missing
        checkpoint and any setting that would make the run differ from the checkpoint's."""
        try:
            folder, state, optimizer = ckpt.load_run(self.folder.checkpoints)
        except ckpt.CheckpointError as exc:
            raise TrainError(str(exc)) from None
        ckpt.check_resumable(folder, state, model_config=self.model_config.to_dict(),
                             train_config=self.cfg.to_dict(),
                             fingerprint=self.corpus["fingerprint"], phases=len(self.phases))
        self.engine.load(folder / ckpt.MODEL_FILE, optimizer)
        self.load_state_dict(state)
        if self.engine.is_main:
            self.log.truncate_after(self.step)

    # -------------------------------------------------------------- training
    def phase(self, step: int) -> Phase:
        """The phase optimizer step `step` (0-based) belongs to."""
        if len(self.phases) > 1 and step >= self.cfg.steps - self.cfg.final_steps:
            return self.phases[1]
        return self.phases[0]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch: global micro-batch `m` goes to rank
        `m % world_size`, and each process reads the rows of it the engine asks for
        (`engine.local_rows`)."""
        cfg, engine = self.cfg, self.engine
        self._snapshot = None  # the weights are about to change
        lr = learning_rate(self.step, peak=cfg.lr, warmup_steps=cfg.warmup_steps,
                           total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio)
        phase = self.phase(self.step)
        # Every rank draws the step's global indices (cheap) and builds only the rows of
        # its own share (`data.step_share`).
        indices = phase.stream.take(phase.batch_size)
        shares = step_share(indices, engine.rank, engine.world_size, phase.micro_batch_size)
        # The next step's rows are known already: have them read while this step computes.
        upcoming = step_share(phase.stream.peek(phase.batch_size), engine.rank,
                              engine.world_size, phase.micro_batch_size)
        phase.table.prefetch(np.concatenate([engine.local_rows(rows) for rows in upcoming]))
        micro_batches = [MicroBatch(a * engine.world_size + engine.rank, len(rows),
                                    phase.table.rows(engine.local_rows(rows)))
                         for a, rows in enumerate(shares)]
        loss_total, ce_total = engine.backward(micro_batches, self.step)
        token_total = sum(micro.batch.num_data_tokens for micro in micro_batches)
        loss_mean, ce_sum_all, tokens_all = engine.all_reduce_mean(
            [loss_total / phase.accumulation, ce_total, float(token_total)])
        grad_norm = engine.update(lr, before_step=lambda norm: self._check_finite(loss_mean,
                                                                                  norm))
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
            if self.engine.is_main:
                self.log.write(kind="stopped", step=self.step + 1, reason="non-finite",
                               **{k: str(v) for k, v in (("loss", loss), ("grad_norm", grad_norm))})
            raise NonFiniteError(
                f"step {self.step + 1}: non-finite {' and '.join(bad)}; training stopped before "
                f"the optimizer step (no weights updated or saved). "
                f"{ckpt.last_good(self.folder.checkpoints)}")

    def _plain(self) -> Snapshot:
        """The plain model of this step, gathered once (collective) for everything this
        evaluation/save point does; `train_step` drops it."""
        if self._snapshot is None:
            self._snapshot = Snapshot(self.engine.gather())
        return self._snapshot

    def _require_finite(self, snapshot: Snapshot) -> None:
        """Refuse to save weights holding NaN/Inf (checked on rank 0, agreed by all)."""
        if not snapshot.checked:
            bad = self.engine.non_finite(snapshot.model) if self.engine.is_main else None
            ckpt.refuse_non_finite(self.engine.broadcast(bad), self.step, self.folder.checkpoints)
            snapshot.checked = True

    def evaluate(self, with_score: bool) -> dict[str, float]:
        """Held-out cross-entropy (and, if asked, the exact score) on rank 0."""
        snapshot = self._plain()
        out: dict[str, float] = {}
        if self.engine.is_main:
            out = evaluate(snapshot.model, self.val_data, [p.seq_len for p in self.phases],
                           cross_entropy=self.engine.cross_entropy,
                           batch_tokens=self.cfg.eval_batch_size * self.cfg.seq_len,
                           seed=self.cfg.score_seed,
                           contract=self.contract if with_score else None)
        self.engine.barrier()
        return out

    def run(self) -> TrainResult:
        """Train to `cfg.steps` (or `max_minutes`), then release the run folder. SIGTERM and
        SIGINT stop it with an exception that removes any half-written checkpoint."""
        try:
            with terminate_raises():
                return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        cfg, engine = self.cfg, self.engine
        if engine.is_main:
            self.folder.tidy(overwrite=cfg.overwrite)
        engine.barrier()
        if cfg.resume:
            self.resume()
        if engine.is_main:
            ckpt.write_json(self.out_dir / "run.json", {
                **self._record(), "protocol": self.revision.name,
                "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation})
        start_step, start_tokens, started = self.step, self.tokens, time.perf_counter()
        bar = None
        if engine.is_main and cfg.progress:
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
        snapshot = self._plain()  # the final point's, when the loop ended on one
        self._require_finite(snapshot)
        plot_path = None
        if engine.is_main:
            engine.save_weights(snapshot.model, weights)
            lengths = " then ".join(str(p.seq_len) for p in self.phases)
            plot_path = write_summary(self.out_dir, self.log, {
                "step": self.step, "tokens_per_s": speed, "seconds": seconds,
                "protocol": self.revision.name, "score_seq_len": cfg.score_seq_len,
                "score_batch_size": cfg.score_batch_size,
                "score_sig_reg_slices": self.revision.sig_reg_slices, **evals},
                plot_title=(f"{cfg.config} model, sequences of {lengths} bytes" if cfg.plot
                            else None))
        engine.barrier()
        return TrainResult(self.out_dir, weights, self.log.path, plot_path, self.step,
                           evals.get("val_ce"), evals.get("score"), cfg.score_seq_len,
                           speed, seconds, self.revision.name)

    def _loop(self, bar, start_tokens: int, started: float) -> dict[str, float]:
        """The steps, each followed by its evaluation and save points; returns the last
        evaluation."""
        cfg, engine = self.cfg, self.engine
        evals: dict[str, float] = {}
        stopped_early = False
        step_seconds: list[float] = []
        while self.step < cfg.steps:
            step_started = time.perf_counter()
            last = self.train_step()
            elapsed = time.perf_counter() - started
            if cfg.compile and len(step_seconds) < 2:
                step_seconds.append(time.perf_counter() - step_started)
                if len(step_seconds) == 2 or self.step == cfg.steps:
                    report_compile(self.log if engine.is_main else None, self.step,
                                   step_seconds, bar)
            speed = (self.tokens - start_tokens) / max(elapsed, 1e-9)
            if engine.is_main:
                self.log.write(kind="train", step=self.step,
                               tokens=self.tokens, tokens_per_s=round(speed, 1),
                               epoch=round(self.phase(self.step - 1).stream.epoch, 4), **last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['train_ce']:.3f}",
                                    tok_s=f"{speed:,.0f}")
            final = self.step == cfg.steps
            if cfg.max_minutes is not None:
                over = engine.broadcast(elapsed > 60 * cfg.max_minutes)
                if over and not final:
                    stopped_early = final = True
            if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                scored = final or bool(cfg.score_every and self.step % cfg.score_every == 0)
                evals = self.evaluate(with_score=scored)
                if engine.is_main:
                    scored_under = {"protocol": self.revision.name} if "score" in evals else {}
                    self.log.write(kind="eval", step=self.step,
                                   tokens=self.tokens, **evals, **scored_under)
                    if bar is not None:
                        bar.write(describe_evaluation(self.step, evals))
            if final or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self.save_checkpoint()
            if stopped_early:
                if bar is not None:
                    bar.write(f"stopping at step {self.step}: --max-minutes "
                              f"{cfg.max_minutes} reached")
                break
        return evals


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` with its framework's engine (torch joins a torchrun process group when
    launched under one)."""
    engine = engine_for(cfg)
    try:
        return Trainer(cfg, engine=engine).run()
    finally:
        engine.shutdown()


__all__ = ["NonFiniteError", "TrainConfig", "TrainConfigError", "TrainError", "TrainResult",
           "Trainer", "train"]
