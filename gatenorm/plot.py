"""Figures: attention scores per layer (the Gate-Norm paper's figure)."""

from __future__ import annotations

from pathlib import Path

from gatenorm.io import atomic_path
from gatenorm.scoring import LayerScores


def plot_scores(scores: LayerScores, title: str, path: Path, dropped: list[int] | None = None) -> None:
    """Bar chart of the score of every layer, dropped layers highlighted, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dropped = set(dropped or [])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(scores.scores)), 3.5), dpi=120)
    colors = ["tab:red" if i in dropped else "tab:blue" for i in range(len(scores.scores))]
    ax.bar(range(len(scores.scores)), scores.scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{scores.method} score")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
