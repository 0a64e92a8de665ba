"""Measuring a run: its evaluation (held-out cross-entropy, the exact on-chain score), a
JSONL log, the summary and the loss plot. Framework-free: the engine supplies the
cross-entropy of its framework's model, and the score is `soma_models.v1.scoring`'s."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from soma_models.atomic import atomic_write
from soma_models.train.checkpoint import write_json
from soma_models.train.plot import MISSING_MATPLOTLIB, plot_losses
from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.scoring import Score, score


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so `tail -f` works."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, ["".join(k + "\n" for k in kept).encode("utf-8")])


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def exact_score(model: Any, data: bytes, seed: int, *,
                contract: ScoringContract | None = None, max_seq_len: int | None = None,
                batch_size: int | None = None,
                sig_reg_config: SIGRegConfig | None = None) -> Score:
    """The on-chain score of `model` on `data` with `seed` (SPEC §6), by
    `soma_models.v1.scoring.score` itself: the trainer reports the number the chain would.

    contract: the run's revision and scoring settings (None: the process-wide revision's);
    the parts override it. `Score.protocol` names the contract's revision. The scoring
    backend runs the model in evaluation mode and without gradients, whatever its framework."""
    return score(model, data, seed, model_config=model.config, contract=contract,
                 sig_reg_config=sig_reg_config, max_seq_len=max_seq_len,
                 batch_size=batch_size)


CrossEntropy = Callable[[Any, bytes, int, int], float]


def evaluate(model: Any, data: bytes, lengths: Sequence[int], *, cross_entropy: CrossEntropy,
             batch_tokens: int, seed: int, contract: ScoringContract | None) -> dict[str, float]:
    """A run's evaluation of its plain `model` on held-out `data`.

    Held-out cross-entropy at every training length in `lengths` (`cross_entropy(model,
    data, length, rows)` is the engine's, with `batch_tokens // length` rows a batch);
    `val_ce` is the last length's (what the finished model is trained for), and the
    per-length `val_ce_at_N` are kept only with a curriculum. With a `contract`, `score`
    is the exact on-chain score under it with `seed`."""
    out = {f"val_ce_at_{length}": cross_entropy(model, data, length,
                                                max(1, batch_tokens // length))
           for length in lengths}
    out["val_ce"] = out[f"val_ce_at_{lengths[-1]}"]
    if len(lengths) == 1:
        del out[f"val_ce_at_{lengths[0]}"]
    if contract is not None:
        out["score"] = float(exact_score(model, data, seed, contract=contract).loss)
    return out


def describe_evaluation(step: int, evals: dict[str, float]) -> str:
    """One line for the progress bar."""
    return (f"step {step}: held-out CE {evals['val_ce']:.4f}"
            + "".join(f", at {k[len('val_ce_at_'):]} bytes {v:.4f}"
                      for k, v in evals.items() if k.startswith("val_ce_at_"))
            + (f", exact score {evals['score']:.4f}" if "score" in evals else ""))


def write_summary(out_dir: Path, log: MetricsLog, summary: dict[str, Any], *,
                  plot_title: str | None) -> Path | None:
    """`summary.json`, and the loss plot `loss.png` from the metrics log unless
    `plot_title` is None. Returns the plot's path (None: not asked, or no matplotlib,
    which is said on stderr)."""
    plot_path = None
    if plot_title is not None:
        records = read_metrics(log.path) if log.path.exists() else []
        plot_path = plot_losses(records, out_dir / "loss.png", title=plot_title)
        if plot_path is None:
            print(MISSING_MATPLOTLIB, file=sys.stderr)
    write_json(out_dir / "summary.json", summary)
    return plot_path


def report_compile(log: MetricsLog | None, step: int, step_seconds: list[float], bar) -> None:
    """Log what `--compile` cost (rank 0 passes its `log`, the others None): the first step
    compiles the blocks, the second runs them; their difference is the compile time (one
    step only: the first, as is). One line on the progress bar, else on stderr."""
    first = step_seconds[0]
    compile_s = first - step_seconds[1] if len(step_seconds) > 1 else first
    if log is None:
        return
    record = {"first_step_s": round(first, 3), "compile_s": round(compile_s, 3)}
    if len(step_seconds) > 1:
        record["second_step_s"] = round(step_seconds[1], 3)
    log.write(kind="compile", step=step, **record)
    line = (f"torch.compile: the first step took {first:.1f} s, about {compile_s:.1f} s "
            f"of it compiling the blocks")
    if bar is not None:
        bar.write(line)
    else:
        print(line, file=sys.stderr, flush=True)
