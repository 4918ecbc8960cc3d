"""`serve_cli eval` of a regression model: metrics.json, predictions.jsonl, scatter.png (predicted against
true) and report.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from loraship.rows import input_record
from serve_cli.plots import save_plot

SUMMARY = ("pearson", "spearman", "mse", "rmse", "mae")


def write_report(tmp: Path, texts: list[Any], y: np.ndarray, results: list[dict[str, Any]], extra: dict[str, Any],
                 args: argparse.Namespace) -> None:
    main = results[0]["report"]
    pred = results[0]["probs"][:, 0]
    compare = [{k: r["report"][k] for k in ("model", "variant", *SUMMARY, "rows_per_second", "bytes")} for r in results]
    (tmp / "metrics.json").write_text(json.dumps({**main, "extra_metrics": extra, "compare": compare}, indent=2))
    with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for text, t, p in zip(texts, y.tolist(), pred.tolist(), strict=True):
            f.write(json.dumps({**input_record(text), "true": t, "pred": round(p, 6)}, ensure_ascii=False) + "\n")
    plotted = plot_scatter(y, pred, main, tmp / "scatter.png")
    (tmp / "report.md").write_text(markdown(main, compare, extra, args.input, plotted, y, pred))


def plot_scatter(y: np.ndarray, pred: np.ndarray, report: dict[str, Any], path: Path) -> str | None:
    """Predicted against true, one dot per row, with the diagonal (a perfect model) and the figures. Returns
    None when plotted, else why not (the report is kept either way)."""
    def draw(ax: Any) -> None:
        ax.scatter(y, pred, s=6, alpha=0.35, color="#4878a8", linewidths=0)
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="#c44e52", linestyle="--", linewidth=1, label="predicted = true")
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        name = f"{Path(report['model']).resolve().parent.name}/{Path(report['model']).name}"
        ax.set_title(f"{name} ({report['variant']}): Pearson {report['pearson']:.3f}, "
                     f"Spearman {report['spearman']:.3f}, MAE {report['mae']:.3f}", fontsize=10)
        ax.legend(loc="upper left")

    return save_plot(path, (6.5, 6), draw)


def markdown(main: dict[str, Any], compare: list[dict[str, Any]], extra: dict[str, Any], input_path: str, no_plot: str | None,
             y: np.ndarray, pred: np.ndarray) -> str:
    lines = [f"# Evaluation of {main['model']} ({main['variant']}), regression", "",
             f"Input: `{input_path}`, {main['rows']} rows; targets {y.min():.3g} to {y.max():.3g} (mean {y.mean():.3g}), "
             f"predictions {pred.min():.3g} to {pred.max():.3g} (mean {pred.mean():.3g}).", "",
             "| model | variant | Pearson | Spearman | MSE | RMSE | MAE | rows/s |", "|---|---|---|---|---|---|---|---|"]
    for r in compare:
        lines.append(f"| {r['model']} | {r['variant']} | {r['pearson']:.4f} | {r['spearman']:.4f} | {r['mse']:.4f} | "
                     f"{r['rmse']:.4f} | {r['mae']:.4f} | {r['rows_per_second']:.0f} |")
    lines += ["", "## Predicted against true", "", f"(no plot: {no_plot})" if no_plot else "![predicted against true](scatter.png)"]
    # Error by target range: where on the scale the model is off.
    edges = np.unique(np.quantile(y, np.linspace(0, 1, 6)))
    if len(edges) > 2:
        lines += ["", "## Error by target range (quintiles of the true value)", "", "| true from | to | rows | mean true | mean predicted | MAE |",
                  "|---|---|---|---|---|---|"]
        bins = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, len(edges) - 2)
        for b in range(len(edges) - 1):
            at = bins == b
            if at.any():
                lines.append(f"| {edges[b]:.3g} | {edges[b + 1]:.3g} | {int(at.sum())} | {y[at].mean():.3f} | {pred[at].mean():.3f} | "
                             f"{np.abs(pred[at] - y[at]).mean():.3f} |")
    if extra:
        lines += ["", "## Extra metrics (evaluate)", ""] + [f"- {k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"
