"""The canonical V1 weight layout (SPEC §4), framework-free.

One list of `ParamSpec`s says, for a given `ModelConfig`, which keys a weights file must
hold, their shapes, and what kind of parameter each is; the torch and Flax serde layers,
`validate` and `score` all read it from here. Everything is float32; linear weights are
`[in, out]` (y = x @ W + b).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from soma_models.errors import WeightsError, WeightsWarning
from soma_models.safetensors_io import FLOAT32_CONVERTIBLE, SafetensorsFile, format_dtype
from soma_models.v1.configs import V1_NUM_HEADS, ModelConfig
from soma_models.v1.revisions import ARCHITECTURE_VERSION, Revision, resolve

METADATA_VERSION_KEY = "soma_models.architecture_version"
# Heads cannot be read off the shapes; we record them (the runtime ignores metadata).
METADATA_HEADS_KEY = "soma_models.num_heads"
# The revision (SPEC §1) the writer worked under; informational, the runtime ignores it.
METADATA_PROTOCOL_KEY = "soma_models.protocol"
CANONICAL_DTYPE = "F32"
#: Dtypes the runtime maps (SPEC §4.2): it converts them to float32 on load. A tensor of
#: any other dtype (U16, F8_*, ...) makes it refuse the whole file, even an unused tensor.
RUNTIME_DTYPES = FLOAT32_CONVERTIBLE

Kind = Literal["embedding", "linear_weight", "linear_bias", "norm_gamma", "norm_beta"]


@dataclass(frozen=True)
class ParamSpec:
    key: str
    shape: tuple[int, ...]
    kind: Kind


ATTENTION_PROJECTIONS = ("query", "key", "value", "output")


def _linear(prefix: str, fan_in: int, fan_out: int) -> list[ParamSpec]:
    return [ParamSpec(f"{prefix}.weight", (fan_in, fan_out), "linear_weight"),
            ParamSpec(f"{prefix}.bias", (fan_out,), "linear_bias")]


def _norm(prefix: str, dim: int) -> list[ParamSpec]:
    return [ParamSpec(f"{prefix}.gamma", (dim,), "norm_gamma"),
            ParamSpec(f"{prefix}.beta", (dim,), "norm_beta")]


def param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every canonical parameter of `config`, in model order."""
    d, h, v = config.embedding_dim, config.pwff_hidden_dim, config.vocab_size
    specs = [ParamSpec("embedding.weight", (v, d), "embedding")]
    for layer in range(config.num_layers):
        p = f"encoder.layers.{layer}"
        specs += _norm(f"{p}.norm_1", d)
        for proj in ATTENTION_PROJECTIONS:
            specs += _linear(f"{p}.attention.{proj}", d, d)
        specs += _norm(f"{p}.norm_2", d)
        specs += _linear(f"{p}.pwff.linear_inner", d, h)
        specs += _linear(f"{p}.pwff.linear_outer", h, d)
    specs += _norm("final_norm", d)
    specs += _linear("predictor", d, v)
    return specs


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {s.key: s.shape for s in param_specs(config)}


def parameter_count(config: ModelConfig) -> int:
    total = 0
    for spec in param_specs(config):
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    return total


@dataclass
class SchemaCheck:
    """Result of comparing found tensors with the schema.

    errors: what makes the runtime refuse the file.
    warnings: harmless findings (unused keys).
    converted: expected keys stored in another dtype the runtime converts, `{key: dtype}`.
    """

    errors: list[str]
    warnings: list[str]
    converted: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def conversion_note(converted: Mapping[str, str]) -> str:
    """One line naming the keys the runtime converts to float32, grouped by dtype."""
    by_dtype: dict[str, list[str]] = {}
    for key, dtype in converted.items():
        by_dtype.setdefault(dtype, []).append(key)
    groups = "; ".join(f"{dtype}: {_listing(keys, 4)}" for dtype, keys in by_dtype.items())
    return (f"{len(converted)} tensor(s) are not float32 and are converted to float32 on load, "
            f"as the runtime does, and scored as such ({groups})")


def duplicates_note(duplicates: Mapping[str, int]) -> str:
    """One line naming header keys given more than once."""
    listed = _listing([f"{k!r} x{n}" for k, n in duplicates.items()])
    return f"duplicated header key(s), the last entry used as the runtime does: {listed}"


def file_metadata(config: ModelConfig, protocol: str | Revision | None = None) -> dict[str, str]:
    """Header metadata written with every weights file: architecture version, heads, and
    the revision `protocol` (None: the process-wide one) the file was written for."""
    return {METADATA_VERSION_KEY: str(ARCHITECTURE_VERSION),
            METADATA_HEADS_KEY: str(config.num_heads),
            METADATA_PROTOCOL_KEY: resolve(protocol).name}


def recorded_protocol(metadata: Mapping[str, str]) -> str | None:
    """The revision a file says it was written for (None for files that do not say)."""
    value = metadata.get(METADATA_PROTOCOL_KEY)
    return value if isinstance(value, str) and value else None


def heads_from_metadata(metadata: Mapping[str, str]) -> int:
    try:
        return int(metadata.get(METADATA_HEADS_KEY, V1_NUM_HEADS))
    except ValueError:
        return V1_NUM_HEADS


def check_tensors(
    found: Mapping[str, tuple[str, tuple[int, ...]]], config: ModelConfig
) -> SchemaCheck:
    """Compare `{key: (dtype, shape)}` with the schema; report every difference.

    Missing keys, shape mismatches and any tensor (used or not) of a dtype the runtime
    does not map make it reject the file. Expected keys of another mapped dtype are
    converted (listed in `converted`). Extra keys are only warnings: the runtime ignores them.
    """
    return check_shapes(found, expected_shapes(config))


def check_shapes(
    found: Mapping[str, tuple[str, tuple[int, ...]]], expected: Mapping[str, tuple[int, ...]],
    *, place_all: bool = False,
) -> SchemaCheck:
    """`check_tensors` against any `{key: shape}` (e.g. one block's canonical tensors).

    place_all=True: extra keys are an error naming each of them (a module loaded in place
    has nowhere to put them), not an unused-key warning."""
    errors: list[str] = []
    warnings: list[str] = []
    converted: dict[str, str] = {}
    missing = [k for k in expected if k not in found]
    if missing:
        errors.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    for key, shape in expected.items():
        if key not in found:
            continue
        dtype, got = found[key]
        if tuple(got) != shape:
            errors.append(f"{key}: shape mismatch, expected {list(shape)}, found {list(got)}")
        if dtype != CANONICAL_DTYPE and dtype in RUNTIME_DTYPES:
            converted[key] = dtype
    unmapped = [f"{k} ({dtype})" for k, (dtype, _) in found.items() if dtype not in RUNTIME_DTYPES]
    if unmapped:
        errors.append(f"{len(unmapped)} tensor(s) of a dtype the runtime does not map, so it "
                      f"refuses the whole file (used or not): {_listing(unmapped)}; it maps "
                      f"{', '.join(RUNTIME_DTYPES)}")
    extra = sorted(k for k in found if k not in expected)
    if extra and place_all:
        errors.append(f"{len(extra)} key(s) the module has no parameter for, so they could "
                      f"not be placed: {', '.join(extra)}")
    elif extra:
        warnings.append(f"{len(extra)} unused key(s), ignored by the runtime: {_listing(extra)}")
    return SchemaCheck(errors, warnings, converted)


def heads_note(config: ModelConfig, metadata: Mapping[str, str]) -> str | None:
    """A line when an explicit config's head count contradicts the one the file records."""
    recorded = metadata.get(METADATA_HEADS_KEY)
    if recorded is None or recorded == str(config.num_heads):
        return None
    return (f"the file records num_heads {recorded} ({METADATA_HEADS_KEY}) but the model "
            f"config says {config.num_heads}: {config.num_heads} is used (the runtime always "
            "uses V1's 8)")


_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_heads: int = V1_NUM_HEADS,
    source: str = "<weights>",
    **overrides: object,
) -> ModelConfig:
    """Infer width, depth, hidden size and vocabulary from tensor shapes.

    The number of heads cannot be read off the shapes; it defaults to V1's.
    Raises `WeightsError` naming `source` when the shapes do not describe a V1 model.
    """
    try:
        vocab, dim = shapes["embedding.weight"]
    except (KeyError, ValueError):
        got = shapes.get("embedding.weight")
        raise WeightsError(source, [
            "cannot infer the model config: 'embedding.weight' "
            + ("is missing" if got is None else f"has shape {list(got)}, expected [vocab, dim]")
        ]) from None
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
    num_layers = max(layers) + 1 if layers else 0
    inner = shapes.get("encoder.layers.0.pwff.linear_inner.weight")
    if num_layers == 0 or inner is None or len(inner) != 2:
        raise WeightsError(source, [
            ("cannot infer the model config: no encoder layers "
            "('encoder.layers.0.pwff.linear_inner.weight' missing or malformed)")
        ])
    try:
        return ModelConfig(embedding_dim=int(dim), vocab_size=int(vocab),
                           pwff_hidden_dim=int(inner[1]), num_layers=num_layers,
                           num_heads=num_heads, **overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise WeightsError(source, [(f"cannot infer a valid model config: {exc}; "
                                    "pass model_config explicitly")]) from None


def _warn(source: str, lines: list[str]) -> None:
    for line in lines:
        warnings.warn(f"{source}: {line}", WeightsWarning, stacklevel=4)


def checked_arrays(
    arrays: Mapping[str, np.ndarray],
    config: ModelConfig | None,
    *,
    source: str = "<arrays>",
    num_heads: int | None = None,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Check canonical arrays against the schema and return `(config, arrays)`.

    `config=None` infers the sizes (heads: `num_heads`, else V1's). Every missing key,
    shape or dtype problem is raised at once as a `WeightsError` naming `source`; unused
    keys are a warning, and arrays of another dtype the runtime maps are converted to
    float32 as it would (one warning). The returned dict holds exactly the schema's keys,
    in model order.
    """
    found = {k: (format_dtype(np.asarray(a)), tuple(np.shape(a))) for k, a in arrays.items()}
    if config is None:
        heads = {} if num_heads is None else {"num_heads": num_heads}
        config = infer_config({k: s for k, (_, s) in found.items()}, source=source, **heads)
    check = check_tensors(found, config)
    if not check.ok:
        raise WeightsError(source, check.errors)
    _warn(source, check.warnings + ([conversion_note(check.converted)] if check.converted else []))
    out = {}
    for spec in param_specs(config):
        value = arrays[spec.key]
        if spec.key in check.converted:
            value = np.asarray(value)
            value = (value != 0).astype(np.float32) if value.dtype == np.bool_ \
                else value.astype(np.float32)
        out[spec.key] = value
    return config, out


def read_weights(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    config: ModelConfig | None = None,
) -> tuple[ModelConfig, dict[str, np.ndarray], str]:
    """Open a weights file (path or bytes), check it, return `(config, arrays, name)`.

    The arrays are float32: zero-copy views of the file (a copy-on-write memory map) or
    bytes, or, for tensors stored in another dtype the runtime maps, their conversion as
    the runtime does it. The header is checked before any tensor is touched; duplicated
    keys, unused keys, conversions and a head count contradicting the file's metadata are
    one warning line each.
    """
    weights = SafetensorsFile(source)
    found = {k: (i.dtype, i.shape) for k, i in weights.tensors.items()}
    notes = [duplicates_note(weights.duplicates)] if weights.duplicates else []
    if config is None:
        config = infer_config({k: s for k, (_, s) in found.items()}, source=weights.name,
                              num_heads=heads_from_metadata(weights.metadata))
    elif (note := heads_note(config, weights.metadata)) is not None:
        notes.append(note)
    check = check_tensors(found, config)
    if not check.ok:
        raise WeightsError(weights.name, check.errors)
    notes += check.warnings
    if check.converted:
        notes.append(conversion_note(check.converted))
    _warn(weights.name, notes)
    arrays = {spec.key: weights.float32(spec.key) for spec in param_specs(config)}
    return config, arrays, weights.name


def read_tensors(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    expected: Mapping[str, tuple[int, ...]],
    *,
    place_all: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """`read_weights` for any `{key: shape}` (e.g. one block's canonical tensors).

    Returns `({key: float32 array}, name)`, checked and converted as `read_weights` does,
    with the same one-line warnings; every problem is raised at once as a `WeightsError`.
    place_all=True: a key of the file that is not in `expected` is a problem too (one
    naming every such key), not an unused-key warning.
    """
    weights = SafetensorsFile(source)
    found = {k: (i.dtype, i.shape) for k, i in weights.tensors.items()}
    check = check_shapes(found, expected, place_all=place_all)
    if not check.ok:
        raise WeightsError(weights.name, check.errors)
    notes = [duplicates_note(weights.duplicates)] if weights.duplicates else []
    notes += check.warnings
    if check.converted:
        notes.append(conversion_note(check.converted))
    _warn(weights.name, notes)
    return {key: weights.float32(key) for key in expected}, weights.name
