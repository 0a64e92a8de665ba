"""A run's settings, each written once: its default, help text, allowed range and whether
`--resume` may change it. Framework-free (the CLI checks options before importing torch).

Five small setting groups (data, model, optimiser, watching and saving, hardware), each a
dataclass; `TrainConfig` is their union, so it stays flat for callers
(`TrainConfig(seq_len=512)`, `cfg.seq_len`) and for the files a run writes (the flat
`train_config` of `run.json` and of every checkpoint). Every field is declared with
`setting(...)`, whose metadata (`Setting`) drives

* the checks before a run (`check_settings`: a `TrainConfigError` naming the option),
* `soma-models train`'s options and `--help` (`soma_models.train.cli` generates them,
  one argument group per setting group, in field order), and
* the resume compatibility check (`resume_may_change`, `checkpoint.check_resumable`).

A new setting is one `setting(...)` line in its group, plus the code that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from soma_models.train.data import SPLITS
from soma_models.train.errors import TrainConfigError
from soma_models.v1.configs import V1_SIG_REG_COEFFICIENT, ModelConfig, preset
from soma_models.v1.noise import check_seed
from soma_models.v1.revisions import Revision, resolve

PARALLEL_MODES = ("ddp", "fsdp")       # distributed strategies under torchrun
FRAMEWORKS = ("torch", "flax")         # the engines of soma-models train
SIZE_FIELDS = ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim")


# ------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """`kind` is "int", "float" or "seed"; bounds are inclusive unless `*_open`."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.kind == "seed":
            return "a u64 (0 .. 2**64 - 1)"
        what = "an integer" if self.kind == "int" else "a finite number"
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if low and high:
            return f"{what} {low} and {high}"
        return f"{what} {low or high}" if (low or high) else what

    def accepts(self, value: Any) -> bool:
        if self.kind == "seed":
            try:
                check_seed(value)
            except (TypeError, ValueError):
                return False
            return True
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.kind == "float" and not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None
                    and (value >= self.high if self.high_open else value > self.high))


def at_least(low: int) -> Rule:
    return Rule("int", low=low)


SEED = Rule("seed")
FRACTION_OPEN = Rule("float", 0.0, 1.0, low_open=True, high_open=True)   # (0, 1)
RATE = Rule("float", 0.0, 1.0, high_open=True)                           # [0, 1)
POSITIVE = Rule("float", 0.0, low_open=True)                             # > 0
NON_NEGATIVE = Rule("float", 0.0)                                        # >= 0


# ------------------------------------------------------------------ one setting

@dataclass(frozen=True)
class Setting:
    """What a field means beyond its type and default.

    help: the `--help` text; `{default}` is the field's default, and the CLI fills
        `{presets}`, `{revisions}`, `{default_revision}`, `{demo_out}`. None: no text.
    rule: the allowed range (None values always pass: "use the default").
    resume: whether `--resume` may change it (how a run is watched, saved and scheduled on
        hardware, not the weights it reaches); every other setting must be the checkpoint's.
    cli: whether `soma-models train` has an option for it.
    flag: the option's spelling when not `--field-name`; `const`: a flag taking no value
        stores this; `parser`: a named argument type of the CLI's (e.g. "positive_int")
        instead of the rule's; `metavar`, `nargs`, `choices` as argparse takes them.
    """

    help: str | None = None
    rule: Rule | None = None
    resume: bool = False
    cli: bool = True
    flag: str | None = None
    const: Any = None
    parser: str | None = None
    metavar: str | None = None
    nargs: str | None = None
    choices: tuple[str, ...] | None = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            **meta: Any) -> Any:
    """A dataclass field carrying its `Setting`."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"setting": Setting(**meta)})


def setting_of(field: dataclasses.Field) -> Setting:
    return field.metadata.get("setting", Setting())


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


# ------------------------------------------------------------------ the groups

@dataclass
class DataSettings:
    TITLE: ClassVar[str] = "data"

    data: list[str] = setting(
        default_factory=list, resume=True, parser="existing_path", nargs="+", metavar="PATH",
        help="a corpus folder made by `soma-models prepare`, or files or folders of raw "
             "bytes (read recursively); both are memory-mapped")
    # A row needs an input and a next-byte target: at least 2.
    seq_len: int = setting(512, rule=at_least(2),
                           help="training sequence length (default {default})")
    final_seq_len: int | None = setting(
        None, rule=at_least(2),
        help="curriculum: train the last --final-steps steps on sequences this long (same "
             "tokens per step), e.g. the revision's max_seq_len (1024 under 0.1.7, 8192 under "
             "0.1.1)")
    final_steps: int = setting(0, rule=at_least(0),
                               help="steps at --final-seq-len (default {default})")
    val_fraction: float = setting(0.1, rule=FRACTION_OPEN,
                                  help="held-out share (default {default})")
    split: str = setting("bytes", choices=SPLITS,
                         help="hold out whole files or each file's tail (default {default})")
    # Evaluating a 10 % share of a 100 GB corpus at every --eval-every would take hours and
    # hold gigabytes: evaluation and the score read only the first this many held-out bytes.
    val_max_bytes: int | None = setting(
        1 << 24, rule=at_least(1), resume=True, metavar="N",
        help="held-out bytes evaluated and scored: the first this many of the held-out set "
             "(default {default})")
    shuffle: bool = setting(True, flag="--no-shuffle", const=False)


@dataclass
class ModelSettings:
    TITLE: ClassVar[str] = "model"

    config: str = setting(  # a preset of soma_models.v1.configs.PRESETS
        "tiny", resume=True,
        help="size preset: {presets} (default {default}; v1 has the revision's layers)")
    # Explicit sizes override the preset's (resume compares them through the model config).
    embedding_dim: int | None = setting(None, rule=at_least(1), resume=True,
                                        parser="positive_int",
                                        help="override the preset's value")
    num_layers: int | None = setting(None, rule=at_least(1), resume=True,
                                     parser="positive_int", help="override the preset's value")
    num_heads: int | None = setting(None, rule=at_least(1), resume=True,
                                    parser="positive_int", help="override the preset's value")
    pwff_hidden_dim: int | None = setting(None, rule=at_least(1), resume=True,
                                          parser="positive_int",
                                          help="override the preset's value")
    dropout: float = setting(0.0, rule=RATE, resume=True,
                             help="dropout rate while training (default {default})")
    # Only matters before the first step, so a resume may name another file (or none).
    init_from: str | None = setting(
        None, resume=True, parser="input_file", metavar="WEIGHTS",
        help="start from these canonical weights instead of from scratch")


@dataclass
class OptimiserSettings:
    TITLE: ClassVar[str] = "optimisation"

    steps: int = setting(1000, rule=at_least(1), parser="positive_int",
                         help="optimizer steps (default {default})")
    batch_size: int = setting(16, rule=at_least(1), parser="positive_int",
                              help="global batch in sequences (default {default})")
    # Per process (Flax: per mesh, its world_size is 1); None: batch_size / world_size.
    micro_batch_size: int | None = setting(
        None, rule=at_least(1), resume=True, parser="positive_int",
        help="sequences per forward pass per process (Flax: over all its devices; default: "
             "batch / processes); gradients accumulate over the rest")
    lr: float = setting(1e-3, rule=POSITIVE, help="peak learning rate (default {default})")
    min_lr_ratio: float = setting(0.1, rule=Rule("float", 0.0, 1.0),
                                  help="final lr / peak (default {default})")
    warmup_steps: int = setting(100, rule=at_least(0),
                                help="linear warmup steps (default {default})")
    weight_decay: float = setting(0.1, rule=NON_NEGATIVE,
                                  help="AdamW decay on matrices (default {default})")
    grad_clip: float = setting(1.0, rule=NON_NEGATIVE,
                               help="global grad-norm clip, 0 = off (default {default})")
    sig_reg_coefficient: float = setting(
        V1_SIG_REG_COEFFICIENT, rule=NON_NEGATIVE,
        help="SIGReg weight in the training loss (default: the chain's {default})")
    sig_reg_slices: int | None = setting(  # None: the protocol revision's (256 or 1024)
        None, rule=at_least(1), parser="positive_int",
        help="SIGReg directions per micro-batch (default: the revision's, 256 under 0.1.7, "
             "1024 under 0.1.1)")
    sig_reg_positions: int | None = setting(
        None, rule=at_least(1), parser="positive_int",
        help="compute SIGReg on this many random positions per micro-batch (an unbiased "
             "estimate; default: all)")
    bf16: bool = setting(  # train_step.check_bf16_autocast; Flax: flax_engine.micro_gradients
        False, const=True,
        help="bfloat16 compute, float32 weights (CUDA; on CPU it runs but is usually slower)")
    seed: int = setting(0, rule=SEED, parser="seed",
                        help="seed for init, data order, dropout (default {default})")
    beta1: float = setting(0.9, rule=RATE, cli=False)
    beta2: float = setting(0.95, rule=RATE, cli=False)


@dataclass
class WatchSettings:
    TITLE: ClassVar[str] = "watching and saving"

    out_dir: str = setting("runs/soma", resume=True, flag="--out", metavar="DIR",
                           parser="out_folder",
                           help="run folder (default {default}; --demo: {demo_out})")
    protocol: str | None = setting(  # the V1 revision scored against (None: the default)
        None, resume=True, parser="protocol", metavar="REVISION",
        help="V1 revision the exact score and the SIGReg default follow: {revisions} "
             "(default: $SOMA_MODELS_PROTOCOL, else {default_revision})")
    eval_every: int = setting(100, rule=at_least(0), resume=True,
                              help="held-out CE every N steps (default {default})")
    score_every: int = setting(0, rule=at_least(0), resume=True,
                               help="exact on-chain score every N steps (default: at the end "
                                    "only)")
    score_seed: int = setting(0, rule=SEED, resume=True, parser="seed",
                              help="scoring seed (default {default})")
    score_seq_len: int | None = setting(  # None: the revision's max_seq_len (1024 or 8192)
        None, rule=at_least(2), resume=True,
        help="max_seq_len used for the exact score (default: the revision's)")
    score_batch_size: int | None = setting(  # None: the revision's batch size (16 or 32)
        None, rule=at_least(1), resume=True, parser="positive_int",
        help="scoring batch size (default: the revision's)")
    checkpoint_every: int = setting(200, rule=at_least(0), resume=True,
                                    help="checkpoint every N steps (default {default})")
    keep_checkpoints: int = setting(2, rule=at_least(1), resume=True, parser="positive_int",
                                    help="checkpoints kept (default {default})")
    resume: bool = setting(False, resume=True, const=True,
                           help="continue the run in --out from its newest checkpoint (the "
                                "settings that decide the weights must be the checkpoint's)")
    overwrite: bool = setting(False, resume=True, const=True,
                              help="replace the run already in --out (its model, metrics, "
                                   "checkpoints)")
    max_minutes: float | None = setting(None, rule=POSITIVE, resume=True,
                                        help="stop (and save) after this long")
    progress: bool = setting(True, resume=True, flag="--no-progress", const=False)
    plot: bool = setting(True, resume=True, flag="--no-plot", const=False)
    eval_batch_size: int = setting(8, rule=at_least(1), resume=True, cli=False)


@dataclass
class HardwareSettings:
    """Where and how fast a run computes; never what it computes, up to float summation
    order (so `--resume` may change all of them)."""

    TITLE: ClassVar[str] = "hardware"

    # Not resumable: a checkpoint's optimizer and RNG states are its framework's.
    framework: str = setting("torch", choices=FRAMEWORKS,
                             help="torch (default) or flax (JAX: a data-parallel mesh over "
                                  "this host's devices)")
    device: str | None = setting(None, resume=True, parser="device",
                                 help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    threads: int | None = setting(None, rule=at_least(1), resume=True, parser="positive_int",
                                  help="torch CPU threads (default: torch's choice; 1 is often "
                                       "best for small models on a busy machine)")
    parallel: str | None = setting(None, resume=True, choices=PARALLEL_MODES,
                                   help="under torchrun: ddp (default) or fsdp (FSDP2 sharding)")
    # Speed/memory options of train_step.prepare_model.
    activation_checkpointing: bool = setting(
        False, resume=True, const=True,
        help="recompute each transformer block in the backward pass: activation memory of "
             "one block instead of all (V1's 16 x 1024 batch on one 80 GB GPU), about a "
             "third more compute, the same gradients")
    compile: bool = setting(
        False, resume=True, const=True,
        help="torch.compile each transformer block (the first step pays the compile time, "
             "logged; evaluation and the exact score stay eager; with --dropout the masks "
             "come from the compiler's generator, so they differ from eager ones); off by "
             "default, see benchmarks/README.md")


#: Settings only the torch engine honours, with what --framework flax does instead.
TORCH_ONLY = {
    "parallel": "the batch is split over a jax.sharding mesh of this host's devices instead",
    "threads": "XLA sizes its own CPU thread pool",
    "sig_reg_positions": "SIGReg runs on every position",
    "activation_checkpointing": "not implemented for Flax",
    "compile": "every Flax step is compiled by jax.jit already",
}

#: The groups in `--help` order.
GROUPS = (DataSettings, ModelSettings, OptimiserSettings, WatchSettings, HardwareSettings)


# Bases listed last-group-first: dataclasses collect fields from the last base on, so the
# fields come in GROUPS order.
@dataclass
class TrainConfig(HardwareSettings, WatchSettings, OptimiserSettings, ModelSettings,
                  DataSettings):
    """Everything a run depends on. Defaults suit a small model on one machine."""

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


# ------------------------------------------------------------------ checks

def option_name(field_name: str) -> str:
    """The command-line spelling of a TrainConfig field."""
    return "--" + field_name.replace("_", "-")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: Settings `--resume` may change (every other one must be the checkpoint's).
RESUME_MAY_CHANGE = frozenset(name for name, f in FIELDS.items() if setting_of(f).resume)


def problem(field_name: str, value: Any) -> str | None:
    """Why `value` is not allowed for the field ("must be ..., got ..."), or None if it is."""
    rule = setting_of(FIELDS[field_name]).rule
    if value is None or rule is None or rule.accepts(value):
        return None
    return f"must be {rule.describe()}, got {value!r}"


def check(field_name: str, value: Any) -> Any:
    """`value` if it satisfies the field's rule (or is None); TrainConfigError otherwise."""
    reason = problem(field_name, value)
    if reason is not None:
        raise TrainConfigError(f"{option_name(field_name)} {reason}")
    return value


def parse(field_name: str, text: str) -> Any:
    """Command-line `text` as the field's value; ValueError("must be ..., got ...") if bad."""
    rule = setting_of(FIELDS[field_name]).rule
    assert rule is not None, field_name
    try:
        if rule.kind == "float":
            value: Any = float(text)
        else:
            value = int(text, 0) if rule.kind == "seed" else int(text)
    except ValueError:
        raise ValueError(f"must be {rule.describe()}, got {text!r}") from None
    reason = problem(field_name, value)
    if reason is not None:
        raise ValueError(reason)
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TrainConfigError(message)


def check_settings(cfg: TrainConfig) -> None:
    """Every setting on its own, and those that exclude each other: before anything."""
    for name in FIELDS:
        check(name, getattr(cfg, name))
    _require(cfg.split in SPLITS, f"unknown split {cfg.split!r}; choose one of {SPLITS}")
    _require(cfg.parallel in (None, *PARALLEL_MODES),
             f"unknown --parallel {cfg.parallel!r}; choose ddp or fsdp")
    _require(cfg.framework in FRAMEWORKS,
             f"unknown --framework {cfg.framework!r}; choose torch or flax")
    if cfg.framework == "flax":
        for name, instead in TORCH_ONLY.items():
            _require(getattr(cfg, name) in (None, False),
                     f"{option_name(name)} is torch-only; --framework flax cannot honour it "
                     f"({instead})")
        _require(cfg.device is None or cfg.device == "cpu" or cfg.device.startswith("cuda"),
                 f"--device {cfg.device} is torch-only; --framework flax takes cpu, cuda or "
                 f"cuda:N")
    _require(not (cfg.resume and cfg.overwrite),
             "--resume and --overwrite exclude each other: continue the run, or replace it")


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch of `batch_size` chunks spreads over `world_size` processes."""

    micro_batch_size: int   # chunks per forward pass per process
    accumulation: int       # forward passes per process per step


def batch_layout(cfg: TrainConfig, world_size: int) -> BatchLayout:
    """The batch layout for this number of processes (TrainConfigError if it does not fit),
    including the curriculum's final phase."""
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world_size)
    _require(cfg.batch_size % (micro * world_size) == 0,
             f"batch size {cfg.batch_size} is not a multiple of micro-batch size {micro} x "
             f"{world_size} process(es)")
    if cfg.final_seq_len is not None and cfg.final_steps > 0:
        _require(0 < cfg.final_steps <= cfg.steps,
                 f"--final-steps must be in 1..--steps ({cfg.steps}), got {cfg.final_steps}")
        rows = cfg.batch_size * cfg.seq_len // cfg.final_seq_len
        _require(rows >= world_size and rows % world_size == 0,
                 f"--final-seq-len {cfg.final_seq_len} leaves {rows} sequence(s) per step "
                 f"(batch {cfg.batch_size} x seq-len {cfg.seq_len} / final length), not a "
                 f"positive multiple of {world_size} process(es)")
    return BatchLayout(micro, cfg.batch_size // (micro * world_size))
