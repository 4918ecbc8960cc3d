"""One way to draw the report plots of `serve_cli eval`: matplotlib (Agg) imported only here and only when a
plot is drawn; a plot that fails costs the plot, never the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_plot(path: Path, size: tuple[float, float], draw: Callable[[Any], None]) -> str | None:
    """`draw(ax)` on a figure of `size` inches, saved as a PNG at `path`. Returns None when saved, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=size)
        try:
            draw(ax)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
    except Exception as e:  # matplotlib's limits vary by version and backend
        return f"the plot failed ({type(e).__name__}: {e})"
    return None
