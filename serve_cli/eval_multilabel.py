"""`serve_cli eval` of a multi-label model: metrics.json, predictions.jsonl, per_label_f1.png and report.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from loraship.rows import input_record
from loraship.task import Task
from serve_cli.plots import save_plot

SUMMARY = ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "accuracy", "hamming_loss", "jaccard_samples")


def write_report(tmp: Path, task: Task, texts: list[str], y: np.ndarray, results: list[dict[str, Any]], extra: dict[str, Any],
                 args: argparse.Namespace) -> None:
    main = results[0]["report"]
    probs = results[0]["probs"]
    cut = task.cut(args.threshold)
    main["thresholds"] = {"override": args.threshold} if args.threshold is not None else task.thresholds
    compare = [{k: r["report"][k] for k in ("model", "variant", *SUMMARY, "rows_per_second", "bytes")} for r in results]
    (tmp / "metrics.json").write_text(json.dumps({**main, "extra_metrics": extra, "compare": compare}, indent=2))
    with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for text, t, p in zip(texts, y, probs, strict=True):
            row = task.row_output(p, len(task.labels), args.threshold)  # the labels and scores predict writes
            f.write(json.dumps({**input_record(text), "true": [n for n, on in zip(task.labels, t, strict=True) if on],
                                "pred": row["labels"], "scores": row["scores"]}, ensure_ascii=False) + "\n")
    plotted = plot_per_label_f1(main, tmp / "per_label_f1.png")
    (tmp / "report.md").write_text(markdown(main, compare, extra, args.input, plotted, cut))


def plot_per_label_f1(report: dict[str, Any], path: Path) -> str | None:
    """A horizontal bar per label (F1), sorted, with its support: which labels the model gets and which not.
    Returns None when plotted, else why not (the report is kept either way)."""
    rows = sorted(report["per_label"].items(), key=lambda kv: kv[1]["f1"])

    def draw(ax: Any) -> None:
        ax.barh([f"{n} ({c['support']})" for n, c in rows], [c["f1"] for _, c in rows], color="#4878a8")
        ax.axvline(report["f1_macro"], color="#c44e52", linestyle="--", label=f"macro F1 {report['f1_macro']:.3f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("F1 (label, test support)")
        ax.set_title(f"Per-label F1, {Path(report['model']).name} ({report['variant']})")
        ax.legend(loc="lower right")

    return save_plot(path, (8, min(0.28 * len(rows) + 1.5, 60)), draw)


def markdown(main: dict[str, Any], compare: list[dict[str, Any]], extra: dict[str, Any], input_path: str, no_plot: str | None,
             cut: np.ndarray) -> str:
    lines = [f"# Evaluation of {main['model']} ({main['variant']}), multi-label", "",
             f"Input: `{input_path}`, {main['rows']} rows; {len(main['labels'])} labels; a label is on when its probability "
             f">= its threshold ({'one threshold, ' + format(float(cut[0]), '.2f') if np.all(cut == cut[0]) else 'per label, chosen on validation'}).", "",
             "| model | variant | micro F1 | macro F1 | weighted F1 | samples F1 | subset accuracy | Hamming loss | Jaccard | rows/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in compare:
        lines.append(f"| {r['model']} | {r['variant']} | {r['f1_micro']:.4f} | {r['f1_macro']:.4f} | {r['f1_weighted']:.4f} | "
                     f"{r['f1_samples']:.4f} | {r['accuracy']:.4f} | {r['hamming_loss']:.4f} | {r['jaccard_samples']:.4f} | "
                     f"{r['rows_per_second']:.0f} |")
    lines += ["", "## Per label", "", "(no plot: " + no_plot + ")" if no_plot else "![per-label F1](per_label_f1.png)", "",
              "| label | threshold | precision | recall | F1 | support |", "|---|---|---|---|---|---|"]
    for i, (name, c) in enumerate(main["per_label"].items()):
        lines.append(f"| {name} | {cut[i]:.2f} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    if extra:
        lines += ["", "## Extra metrics (evaluate)", ""] + [f"- {k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"
