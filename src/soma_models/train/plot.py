"""Loss curves as a PNG (matplotlib, Agg backend; optional extra `soma-models[plot]`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = ("matplotlib is not installed, so no loss plot was written; "
                      "install it with: pip install 'soma-models[plot]'")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike,
                title: str = "soma-models training") -> Path | None:
    """Plot train loss, held-out cross-entropy and exact score against tokens seen.

    `records` are the metrics-log lines (`kind` = "train" | "eval"). Returns the PNG path,
    or None when matplotlib is missing (the caller prints MISSING_MATPLOTLIB).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["train_ce"] for r in train],
                color="tab:blue", alpha=0.8, lw=1.2, label="train cross-entropy")
    lengths = sorted({k for r in evals for k in r if k.startswith("val_ce_at_")},
                     key=lambda k: int(k[len("val_ce_at_"):]))
    if lengths:  # a sequence-length curriculum: one held-out curve per length
        for key, colour in zip(lengths, ("tab:orange", "tab:red", "tab:purple", "tab:brown")):
            points = [r for r in evals if key in r]
            ax.plot([r["tokens"] for r in points], [r[key] for r in points], "o-",
                    color=colour, lw=1.8,
                    label=f"held-out cross-entropy, {key[len('val_ce_at_'):]}-byte sequences")
    elif evals:
        ax.plot([r["tokens"] for r in evals], [r["val_ce"] for r in evals], "o-",
                color="tab:orange", lw=1.8, label="held-out cross-entropy")
    if evals:
        scored = [r for r in evals if r.get("score") is not None]
        if scored:  # (mean over every position, PAD included, plus 0.02 SIGReg)
            ax.plot([r["tokens"] for r in scored], [r["score"] for r in scored], "s--",
                    color="tab:green", lw=1.2, label="exact on-chain score (CE + SIGReg)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
