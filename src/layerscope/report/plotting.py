"""One figure style for every experiment: layers on the x axis, labelled axes, atomic saves."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from layerscope.jobs.io import atomic_path  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "svg.hashsalt": "layerscope",  # deterministic SVG ids
    "image.cmap": "viridis",
}
PALETTE = plt.get_cmap("tab10").colors


@contextlib.contextmanager
def figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 3.6, **kwargs) -> Iterator:
    """A figure in the house style: ``with figure(2, 2) as (fig, axes): ...``.

    ``axes`` is one Axes for a single panel, a 1-D array for one row or column, else 2-D.
    """
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)
        try:
            if nrows == 1 and ncols == 1:
                yield fig, axes[0, 0]
            elif nrows == 1 or ncols == 1:
                yield fig, axes.ravel()
            else:
                yield fig, axes
        finally:
            plt.close(fig)


def layer_axis(ax, n_layers: int, label: str = "layer (residual boundary: 0 = embeddings)") -> None:
    ax.set_xlabel(label)
    ax.set_xlim(-0.5, n_layers + 0.5)
    step = max(1, round(n_layers / 10))
    ax.set_xticks(range(0, n_layers + 1, step))


def mark_boundaries(ax, boundaries: Sequence[int]) -> None:
    for b in boundaries:
        ax.axvline(b - 0.5, color="0.5", linestyle="--", linewidth=0.8)


def save(fig, path: str | Path) -> None:
    """Save atomically; the format follows the file's suffix (png or svg)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.tight_layout()
        metadata = {"Software": None} if path.suffix == ".png" else {"Date": None}
        fig.savefig(tmp, format=path.suffix.lstrip("."), metadata=metadata)
