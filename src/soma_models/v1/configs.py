"""V1 constants and the configuration dataclasses.

Every number here is part of the on-chain contract (SPEC §1). The ones that differ between
the two revisions of V1 (layers, sequence length, batch size, SIGReg slices) follow the
process-wide revision of `soma_models.v1.revisions` ("0.1.7" unless
`SOMA_MODELS_PROTOCOL` says otherwise), so `ModelConfig()` and `SIGRegConfig()` with no
arguments are exactly what that revision's runtime evaluates. `ModelConfig.for_protocol`
and `SIGRegConfig.for_protocol` build either revision's explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from soma_models.v1.revisions import Revision, default_revision, resolve

_REVISION = default_revision()

V1_EMBEDDING_DIM = 2048
V1_NUM_HEADS = 8
V1_NUM_LAYERS = _REVISION.num_layers
V1_MAX_SEQ_LEN = _REVISION.max_seq_len
V1_PWFF_HIDDEN_DIM = 8192
V1_VOCAB_SIZE = 264
V1_MAX_WAVELENGTH = 10_000.0
V1_SCALE_FACTOR = 1.0
V1_BATCH_SIZE = _REVISION.batch_size
V1_PAD_TOKEN_ID = 256
V1_EOS_TOKEN_ID = 257
V1_SIG_REG_T_MAX = _REVISION.sig_reg_t_max
V1_SIG_REG_SLICES = _REVISION.sig_reg_slices
V1_SIG_REG_POINTS = _REVISION.sig_reg_points
V1_SIG_REG_COEFFICIENT = _REVISION.sig_reg_coefficient
V1_LAYER_NORM_EPS = 1e-5
# The runtime *replaces* future attention scores by this value (SPEC §3.4).
V1_MASK_FILL_VALUE = -1.0e4
# Protocol configuration, not the runtime (which scores any length): data submitted to a
# target is at most this many bytes, in both revisions (SPEC §1).
V1_MAX_SUBMISSION_BYTES = 1_048_576
# Smallest vocabulary that can hold the PAD and EOS ids the data contract emits.
MIN_VOCAB_FOR_CONTRACT = V1_EOS_TOKEN_ID + 1


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a V1-architecture model (defaults: the selected revision's V1)."""

    dropout_rate: float = 0.0
    embedding_dim: int = V1_EMBEDDING_DIM
    pwff_hidden_dim: int = V1_PWFF_HIDDEN_DIM
    num_layers: int = V1_NUM_LAYERS
    num_heads: int = V1_NUM_HEADS
    vocab_size: int = V1_VOCAB_SIZE
    max_wavelength: float = V1_MAX_WAVELENGTH
    scale_factor: float = V1_SCALE_FACTOR

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "pwff_hidden_dim", "num_layers", "num_heads", "vocab_size"):
            _require_positive(name, getattr(self, name))
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide embedding_dim ({self.embedding_dim})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = embedding_dim / num_heads must be even for RoPE, got {self.head_dim} "
                f"(embedding_dim {self.embedding_dim}, num_heads {self.num_heads})"
            )
        if not float(self.max_wavelength) > 0.0:
            raise ValueError(f"max_wavelength must be > 0, got {self.max_wavelength!r}")
        if not float(self.scale_factor) >= 1.0:
            raise ValueError(f"scale_factor must be >= 1.0, got {self.scale_factor!r}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_protocol(cls, protocol: str | Revision | None = None, **overrides: Any) -> ModelConfig:
        """Full-width V1 as revision `protocol` runs it (None: the process-wide one);
        `overrides` replace any field, `num_layers` included."""
        return replace(cls(), **{"num_layers": resolve(protocol).num_layers, **overrides})

    def require_contract_vocab(self) -> None:
        """Refuse vocabularies that cannot hold the PAD/EOS ids of the data contract."""
        if self.vocab_size < MIN_VOCAB_FOR_CONTRACT:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small for the data contract: PAD "
                f"({V1_PAD_TOKEN_ID}) and EOS ({V1_EOS_TOKEN_ID}) need vocab_size >= "
                f"{MIN_VOCAB_FOR_CONTRACT}"
            )


@dataclass(frozen=True)
class SIGRegConfig:
    """SIGReg regulariser settings (defaults: the selected revision's)."""

    t_max: float = V1_SIG_REG_T_MAX
    points: int = V1_SIG_REG_POINTS
    slices: int = V1_SIG_REG_SLICES
    coefficient: float = V1_SIG_REG_COEFFICIENT

    def __post_init__(self) -> None:
        _require_positive("slices", self.slices)
        _require_positive("points", self.points)
        if self.points < 2:
            raise ValueError(f"points must be >= 2, got {self.points}")
        if not float(self.t_max) > 0.0:
            raise ValueError(f"t_max must be > 0, got {self.t_max!r}")
        if not float(self.coefficient) >= 0.0:
            raise ValueError(f"coefficient must be >= 0, got {self.coefficient!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_protocol(cls, protocol: str | Revision | None = None) -> SIGRegConfig:
        """The SIGReg settings revision `protocol`'s runtime scores with."""
        revision = resolve(protocol)
        return cls(t_max=revision.sig_reg_t_max, points=revision.sig_reg_points,
                   slices=revision.sig_reg_slices, coefficient=revision.sig_reg_coefficient)


def _check_block(config: Any) -> None:
    """Checks shared by the per-part configs (the fields each one has)."""
    for name in ("embedding_dim", "pwff_hidden_dim", "num_layers", "num_heads"):
        if hasattr(config, name):
            _require_positive(name, getattr(config, name))
    if not 0.0 <= float(config.dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {config.dropout_rate!r}")
    if hasattr(config, "num_heads"):
        if config.embedding_dim % config.num_heads:
            raise ValueError(f"num_heads ({config.num_heads}) must divide embedding_dim "
                             f"({config.embedding_dim})")
        if (config.embedding_dim // config.num_heads) % 2:
            raise ValueError(f"head_dim = embedding_dim / num_heads must be even for RoPE, "
                             f"got {config.embedding_dim // config.num_heads}")
        if not float(config.max_wavelength) > 0.0:
            raise ValueError(f"max_wavelength must be > 0, got {config.max_wavelength!r}")
        if not float(config.scale_factor) >= 1.0:
            raise ValueError(f"scale_factor must be >= 1.0, got {config.scale_factor!r}")


# Per-part configs, as the published soma-models 0.1.x has them (same fields, same order,
# so positional calls carry over). Every module also accepts a `ModelConfig`, which has
# all of these fields; `dropout_rate` defaults to 0.0 here as in `ModelConfig`.


class _AttentionBlockConfig:
    """What the attention-bearing per-part configs share: the checks and `head_dim`."""

    embedding_dim: int
    num_heads: int

    def __post_init__(self) -> None:
        _check_block(self)

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads


@dataclass(frozen=True)
class EncoderConfig(_AttentionBlockConfig):
    """Hyperparameters of the `Encoder` (the stack of layers)."""

    dropout_rate: float = 0.0
    embedding_dim: int = V1_EMBEDDING_DIM
    pwff_hidden_dim: int = V1_PWFF_HIDDEN_DIM
    num_layers: int = V1_NUM_LAYERS
    num_heads: int = V1_NUM_HEADS
    max_wavelength: float = V1_MAX_WAVELENGTH
    scale_factor: float = V1_SCALE_FACTOR


@dataclass(frozen=True)
class LayerConfig(_AttentionBlockConfig):
    """Hyperparameters of one `Layer` (pre-norm attention + feed-forward block)."""

    dropout_rate: float = 0.0
    embedding_dim: int = V1_EMBEDDING_DIM
    pwff_hidden_dim: int = V1_PWFF_HIDDEN_DIM
    num_heads: int = V1_NUM_HEADS
    max_wavelength: float = V1_MAX_WAVELENGTH
    scale_factor: float = V1_SCALE_FACTOR


@dataclass(frozen=True)
class PositionWiseFeedForwardConfig:
    """Hyperparameters of the `PositionWiseFeedForward` block."""

    dropout_rate: float = 0.0
    embedding_dim: int = V1_EMBEDDING_DIM
    pwff_hidden_dim: int = V1_PWFF_HIDDEN_DIM

    def __post_init__(self) -> None:
        _check_block(self)


def attention_settings(
    num_heads: Any, num_features: int | None, dropout_rate: float | None,
    max_wavelength: float | None, scale_factor: float | None,
) -> tuple[int, int, tuple[float, float, float]]:
    """`(heads, features, (max_wavelength, scale_factor, dropout_rate))` of an attention.

    Either form of the `MultiHeadAttention` constructor: ours, `(config)`, where keywords
    given explicitly override the config's; or the published `(num_heads, num_features,
    *, dropout_rate=0.0, max_wavelength=10000.0, scale_factor=1.0)`.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        config = num_heads
        if num_features is not None:
            raise TypeError("MultiHeadAttention(config) takes no num_features: the config "
                            "gives embedding_dim")
        heads, features = config.num_heads, config.embedding_dim
        defaults = (config.max_wavelength, config.scale_factor, config.dropout_rate)
    else:
        if num_features is None:
            raise TypeError("MultiHeadAttention(num_heads, num_features): num_features missing")
        heads, features = num_heads, num_features
        defaults = (V1_MAX_WAVELENGTH, V1_SCALE_FACTOR, 0.0)
    _require_positive("num_heads", heads)
    _require_positive("num_features", features)
    if features % heads or (features // heads) % 2:
        raise ValueError(f"num_features ({features}) must be num_heads ({heads}) x an even "
                         f"head size (RoPE rotates pairs)")
    given = (max_wavelength, scale_factor, dropout_rate)
    wavelength, scale, rate = (float(d if g is None else g) for g, d in zip(given, defaults))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}")
    return heads, features, (wavelength, scale, rate)


#: Named presets for `init`, the trainer and tests. "v1" is the on-chain architecture of
#: the process-wide revision; `preset("v1", protocol)` gives another revision's.
PRESETS: dict[str, ModelConfig] = {
    "v1": ModelConfig(),
    "medium": ModelConfig(embedding_dim=512, pwff_hidden_dim=2048, num_layers=8, num_heads=8),
    "small": ModelConfig(embedding_dim=256, pwff_hidden_dim=1024, num_layers=4, num_heads=4),
    "tiny": ModelConfig(embedding_dim=64, pwff_hidden_dim=256, num_layers=2, num_heads=4),
}


def preset(name: str, protocol: str | Revision | None = None) -> ModelConfig:
    """The named size; `protocol` only matters for "v1" (24 or 32 layers)."""
    if name == "v1":
        return ModelConfig.for_protocol(protocol)
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown config preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
        ) from None
