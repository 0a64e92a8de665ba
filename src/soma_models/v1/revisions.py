"""The two revisions of V1 the network has run, as data (SPEC §1).

V1 changed in place on 2026-02-23: the runtime's compiled constants changed while the
architecture version stayed 1, and on 2026-03-01 the network's tools moved keys and
checksums from hex to Base58. Nothing on chain records which revision a model was trained
for, so the caller says which one it wants:

* ``"0.1.1"``: the product page (soma-models 0.1.0-0.1.1): 32 layers, sequences of 8192,
  batches of 32, 1024 SIGReg slices, hex keys;
* ``"0.1.7"``: the network since 2026-02-23 (soma-models 0.1.3-0.1.7): 24 layers,
  sequences of 1024, batches of 16, 256 SIGReg slices, Base58 keys. ``"latest"`` names it.

Which one is in use, for any call that does not name one: an explicit ``protocol=``
argument (``--protocol`` in the CLI), else the environment variable
``SOMA_MODELS_PROTOCOL`` as it was when this module was imported, else ``"0.1.7"``.
Everything the revisions share (width, heads, vocabulary, RoPE, SIGReg's grid and
coefficient) lives in `soma_models.v1.configs`.

This module imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

#: Both revisions are architecture version 1: the version on chain did not change.
ARCHITECTURE_VERSION = 1
ENV_VAR = "SOMA_MODELS_PROTOCOL"
DEFAULT_PROTOCOL = "0.1.7"
ALIASES = {"latest": "0.1.7"}

TextEncoding = Literal["hex", "base58"]


class UnknownProtocolError(ValueError):
    """A revision name that is neither a known revision nor an alias."""


@dataclass(frozen=True)
class Revision:
    """What one revision of the V1 runtime computes with.

    num_layers: layers the runtime builds (a file needs at least this many).
    max_seq_len, batch_size: the data contract's row length and rows per batch (SPEC §2).
    sig_reg_slices: SIGReg projection columns; the noise of batch k is `[D, slices]`.
    sig_reg_t_max, sig_reg_points, sig_reg_coefficient: SIGReg's grid and weight (SPEC §5).
    text_encoding: how keys and hashes are written in transit (SPEC §8).
    """

    name: str
    num_layers: int
    max_seq_len: int
    batch_size: int
    sig_reg_slices: int
    text_encoding: TextEncoding
    sig_reg_t_max: float = 3.0
    sig_reg_points: int = 17
    sig_reg_coefficient: float = 0.02
    summary: str = ""

    @property
    def batch_bytes(self) -> int:
        """Data bytes one full batch holds (data up to this size is one batch)."""
        return self.max_seq_len * self.batch_size

    def __str__(self) -> str:
        return self.name


REVISIONS: dict[str, Revision] = {
    "0.1.1": Revision(
        name="0.1.1", num_layers=32, max_seq_len=8192, batch_size=32, sig_reg_slices=1024,
        text_encoding="hex", summary="the product page (soma-models 0.1.0-0.1.1)"),
    "0.1.7": Revision(
        name="0.1.7", num_layers=24, max_seq_len=1024, batch_size=16, sig_reg_slices=256,
        text_encoding="base58", summary="the network since 2026-02-23 (soma-models 0.1.3-0.1.7)"),
}


def known_names() -> list[str]:
    """Every accepted name: the revisions, then the aliases."""
    return [*REVISIONS, *ALIASES]


def lookup(name: object) -> Revision:
    """The revision called `name` (a revision or an alias); one-line error otherwise."""
    if isinstance(name, Revision):
        return name
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in REVISIONS:
        raise UnknownProtocolError(
            f"unknown protocol revision {name!r}; known: {', '.join(known_names())}")
    return REVISIONS[key]


def _from_environment() -> tuple[Revision | None, UnknownProtocolError | None]:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return REVISIONS[DEFAULT_PROTOCOL], None
    try:
        return lookup(value), None
    except UnknownProtocolError as exc:
        return None, UnknownProtocolError(f"{ENV_VAR}={value!r}: {exc}")


# Read once, at import. A bad value is kept as an error (not raised here) so that the CLI
# can report it as one line before anything else imports `configs`, which needs it.
_ENV_REVISION, _ENV_ERROR = _from_environment()


def default_revision() -> Revision:
    """The process-wide revision: `SOMA_MODELS_PROTOCOL` at import, else "0.1.7"."""
    if _ENV_ERROR is not None:
        raise _ENV_ERROR
    assert _ENV_REVISION is not None
    return _ENV_REVISION


def resolve(protocol: object = None) -> Revision:
    """The revision to use: `protocol` when given, else the process-wide default."""
    return default_revision() if protocol is None else lookup(protocol)
