"""The scoring contract: the revision a score is computed under, and its settings.

A score depends on the revision's data contract (`max_seq_len` bytes per row, `batch_size`
rows per batch, SPEC §2) and on its SIGReg settings (SPEC §5). `ScoringContract.of`
builds all of them once from a revision; experiments and tests override single parts.
Every scoring entry point (`score`, `compete`, `score_backend`, `load_backend`, `Screener`,
the trainer's exact score, the CLI) takes one, and fills in whatever it is not given
through `ScoringContract.resolve`: the one place where the revision's defaults are read.

    contract = ScoringContract.of("0.1.1")                  # the product page's runtime
    small = contract.replace(max_seq_len=64, batch_size=4)  # an experiment, same revision
    score(weights, data, seed, contract=small).protocol     # "0.1.1"

The parts are checked where they are used (the tokenizer checks the sizes, `SIGRegConfig`
its fields), so a bad value fails with the same message whichever way it is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.revisions import Revision, resolve


@dataclass(frozen=True)
class ScoringContract:
    """What a score is computed with.

    revision: the V1 revision reproduced (its name is `Score.protocol`).
    max_seq_len, batch_size: the data contract's row length and rows per batch.
    sig_reg: the SIGReg settings (slices decide the noise's `[D, slices]` shape).
    """

    revision: Revision
    max_seq_len: int
    batch_size: int
    sig_reg: SIGRegConfig

    @property
    def protocol(self) -> str:
        """The revision's name ("0.1.1" or "0.1.7")."""
        return self.revision.name

    @classmethod
    def of(cls, protocol: str | Revision | None = None, *, max_seq_len: int | None = None,
           batch_size: int | None = None,
           sig_reg_config: SIGRegConfig | None = None) -> ScoringContract:
        """Revision `protocol`'s contract (None: the process-wide revision), with the
        parts that are not None overriding the revision's."""
        revision = resolve(protocol)
        return cls(revision, revision.max_seq_len, revision.batch_size,
                   SIGRegConfig.for_protocol(revision)).replace(
            max_seq_len=max_seq_len, batch_size=batch_size, sig_reg_config=sig_reg_config)

    def replace(self, *, max_seq_len: int | None = None, batch_size: int | None = None,
                sig_reg_config: SIGRegConfig | None = None) -> ScoringContract:
        """A copy with the parts that are not None overridden (same revision)."""
        changes: dict[str, object] = {}
        if max_seq_len is not None:
            changes["max_seq_len"] = max_seq_len
        if batch_size is not None:
            changes["batch_size"] = batch_size
        if sig_reg_config is not None:
            changes["sig_reg"] = sig_reg_config
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def resolve(cls, contract: ScoringContract | None = None,
                protocol: str | Revision | None = None, *, max_seq_len: int | None = None,
                batch_size: int | None = None,
                sig_reg_config: SIGRegConfig | None = None) -> ScoringContract:
        """The contract a call uses: `contract` (else revision `protocol`'s), with the parts
        that are not None overriding it. A `protocol` naming another revision than
        `contract`'s is refused (ValueError): the call could mean either."""
        if contract is None:
            return cls.of(protocol, max_seq_len=max_seq_len, batch_size=batch_size,
                          sig_reg_config=sig_reg_config)
        if not isinstance(contract, ScoringContract):
            raise TypeError(f"contract must be a ScoringContract, got "
                            f"{type(contract).__name__}")
        if protocol is not None and resolve(protocol).name != contract.protocol:
            raise ValueError(f"protocol={resolve(protocol).name!r} contradicts the contract's "
                             f"revision {contract.protocol!r}; give one of them")
        return contract.replace(max_seq_len=max_seq_len, batch_size=batch_size,
                                sig_reg_config=sig_reg_config)


__all__ = ["ScoringContract"]
