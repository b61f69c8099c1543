"""Figures for calibration (explained variance) and the Loki perplexity sweep (matplotlib, PNG)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from ..data.store import replacing
from ..loki.basis import PCABasis


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` to `path` (format from its suffix, 120 dpi) atomically, then close it."""
    path = Path(path)
    with replacing(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)
    pyplot().close(fig)
    return path


def plot_explained_variance(bases: dict[str, PCABasis], path: str | Path, threshold: float = 0.9) -> Path:
    """Left: rank at `threshold` per layer (mean over KV heads, min-max band) for each basis.
    Right: cumulative explained variance vs components, one curve per layer (mean over heads), first basis."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, basis in bases.items():
        rank = basis.rank_at(threshold).float()
        layers = range(basis.num_layers)
        left.plot(layers, rank.mean(1), marker="o", ms=3, label=f"{name} (mean {rank.mean():.1f}/{basis.head_dim})")
        left.fill_between(layers, rank.min(1).values, rank.max(1).values, alpha=0.2)
    left.set(xlabel="layer", ylabel=f"components for {threshold:.0%} variance", title=f"rank@{threshold:.0%} per layer")
    left.legend()
    name, basis = next(iter(bases.items()))
    curves = basis.explained_variance().mean(1)  # [L, D]
    cmap = plt.get_cmap("viridis")
    for layer, curve in enumerate(curves):
        right.plot(range(1, basis.head_dim + 1), curve, color=cmap(layer / max(1, basis.num_layers - 1)), lw=1)
    right.axhline(threshold, color="gray", ls="--", lw=0.8)
    right.set(xlabel="principal components", ylabel="explained variance", title=f"{name}: one curve per layer")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_perplexity(rows: list[dict], evaluations: dict[str, str], path: str | Path) -> Path:
    """Grouped bars: each setting's perplexity change vs full attention (%), one bar per evaluation
    (`evaluations`: key in the rows -> label), the setting's read cost under its name."""
    plt = pyplot()
    full = rows[0]
    others = rows[1:]
    present = {k: v for k, v in evaluations.items() if k in full}
    width = 0.8 / max(1, len(present))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(others) + 1.5), 5))
    for i, (key, label) in enumerate(present.items()):
        change = [100 * (r[key]["ppl"] / full[key]["ppl"] - 1) for r in others]
        ax.bar([x + (i - (len(present) - 1) / 2) * width for x in range(len(others))], change, width,
               label=f"{label} (full {full[key]['ppl']:.2f})")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(others)), [f"{textwrap.fill(r['setting'], 26)}\ncost {r['cost']:.3f}" for r in others],
                  fontsize=7)
    ax.set(ylabel="perplexity vs full attention (%)", title="Loki on held-out text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
