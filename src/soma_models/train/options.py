"""The allowed range of every numeric training setting, written once.

`TrainConfig` checks its fields against these rules before a run touches anything (a
`TrainConfigError` naming the option), and `soma-models train` uses the same rules as
argument types, so that a bad value is one line with exit status 2 before any work
starts. Framework-free: the CLI checks options without importing torch first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from soma_models.train.errors import TrainConfigError
from soma_models.v1.noise import check_seed


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


def _int(low: int) -> Rule:
    return Rule("int", low=low)


#: TrainConfig field -> rule. `None` values mean "use the default" and are not checked.
RULES: dict[str, Rule] = {
    # data
    "seq_len": _int(2),              # a row needs an input and a next-byte target
    "final_seq_len": _int(2),
    "final_steps": _int(0),
    "val_fraction": Rule("float", 0.0, 1.0, low_open=True, high_open=True),
    # model
    "embedding_dim": _int(1),
    "num_layers": _int(1),
    "num_heads": _int(1),
    "pwff_hidden_dim": _int(1),
    "dropout": Rule("float", 0.0, 1.0, high_open=True),
    # optimisation
    "steps": _int(1),
    "batch_size": _int(1),
    "micro_batch_size": _int(1),
    "lr": Rule("float", 0.0, low_open=True),
    "min_lr_ratio": Rule("float", 0.0, 1.0),
    "warmup_steps": _int(0),
    "weight_decay": Rule("float", 0.0),
    "beta1": Rule("float", 0.0, 1.0, high_open=True),
    "beta2": Rule("float", 0.0, 1.0, high_open=True),
    "grad_clip": Rule("float", 0.0),
    "sig_reg_coefficient": Rule("float", 0.0),
    "sig_reg_slices": _int(1),
    "sig_reg_positions": _int(1),
    "seed": Rule("seed"),
    # watching and saving
    "eval_every": _int(0),
    "eval_batch_size": _int(1),
    "score_every": _int(0),
    "score_seed": Rule("seed"),
    "score_seq_len": _int(2),
    "score_batch_size": _int(1),
    "checkpoint_every": _int(0),
    "keep_checkpoints": _int(1),
    "max_minutes": Rule("float", 0.0, low_open=True),
    # hardware
    "threads": _int(1),
}


def option_name(field_name: str) -> str:
    """The command-line spelling of a TrainConfig field."""
    return "--" + field_name.replace("_", "-")


def problem(field_name: str, value: Any) -> str | None:
    """Why `value` is not allowed for the field ("must be ..., got ..."), or None if it is."""
    rule = RULES.get(field_name)
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
    rule = RULES[field_name]
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
