"""The one metrics module: classification metrics in numpy, the same definitions as scikit-learn (which the
serving path does not import), for training, the export gate and serve_cli eval alike."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, weighted/macro precision-recall-F1, per-class figures and the confusion matrix (rows = true)."""
    n = len(labels)
    cm = confusion(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = support.sum()
    weights = support / total if total else np.zeros(n)
    return {
        "rows": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "f1_weighted": float((f1 * weights).sum()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "labels": labels,
        "confusion_matrix": cm.tolist(),
    }


def summary_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], detailed: bool = False) -> dict[str, Any]:
    """Accuracy, weighted and macro F1; with `detailed`, per-class figures and the confusion matrix too."""
    report = classification_report(np.asarray(y_true), np.asarray(y_pred), labels)
    keep = ("accuracy", "f1_weighted", "f1_macro") + (("per_class", "confusion_matrix", "labels") if detailed else ())
    return {k: report[k] for k in keep}
