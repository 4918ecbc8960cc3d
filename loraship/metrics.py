"""The one metrics module: classification and regression metrics in numpy, the same definitions as
scikit-learn and scipy (which the serving path does not import), for training, the export gate and serve_cli
eval alike."""

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


# --- multi-label ------------------------------------------------------------------------------------------

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)  # candidate decision thresholds (a label is on at p >= t)


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, p = y_true.astype(bool), y_pred.astype(bool)
    return (t & p).sum(0).astype(float), (~t & p).sum(0).astype(float), (t & ~p).sum(0).astype(float)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Micro / macro / weighted / samples F1, per-label precision, recall, F1 and support, subset accuracy,
    Hamming loss and Jaccard (samples), as scikit-learn defines them with zero_division=0. `y_true` and
    `y_pred` are 0/1 matrices (rows x labels)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp, fp, fn = _counts(t, p)
    support = tp + fn
    precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, support), _f1(tp, fp, fn)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    inter, union = (t & p).sum(1).astype(float), (t | p).sum(1).astype(float)
    sizes = t.sum(1) + p.sum(1)
    weights = support / support.sum() if support.sum() else np.zeros(len(labels))
    return {
        "rows": len(t),
        "accuracy": float((t == p).all(1).mean()) if len(t) else 0.0,  # subset accuracy: every label right
        "f1_micro": float(_f1(np.array(TP), np.array(FP), np.array(FN))),
        "f1_macro": float(f1.mean()) if len(labels) else 0.0,
        "f1_weighted": float((f1 * weights).sum()),
        "f1_samples": float(_ratio(2 * inter, sizes).mean()) if len(t) else 0.0,
        "precision_micro": float(_ratio(np.array(TP), np.array(TP + FP))),
        "recall_micro": float(_ratio(np.array(TP), np.array(TP + FN))),
        "hamming_loss": float((t != p).mean()) if t.size else 0.0,
        "jaccard_samples": float(_ratio(inter, union).mean()) if len(t) else 0.0,
        "per_label": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(labels)},
        "labels": labels,
    }


def decide(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """The labels that are on: probability >= the label's threshold."""
    return probs >= np.asarray(thresholds, dtype=probs.dtype if probs.dtype.kind == "f" else np.float64)


def macro_f1_by_threshold(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Macro F1 at each threshold of THRESHOLD_GRID applied to every label."""
    out = np.empty(len(THRESHOLD_GRID))
    for k, th in enumerate(THRESHOLD_GRID):
        out[k] = _f1(*_counts(y_true, probs >= th)).mean()
    return out


def best_on_grid(scores: np.ndarray) -> float:
    """The THRESHOLD_GRID value with the best score; ties go to the threshold nearest 0.5."""
    top = scores.max()
    nearest_half = np.argsort(np.abs(THRESHOLD_GRID - 0.5), kind="stable")
    return float(THRESHOLD_GRID[next(i for i in nearest_half if scores[i] >= top - 1e-12)])


def best_global_threshold(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The one threshold for every label with the best macro F1."""
    return best_on_grid(macro_f1_by_threshold(np.asarray(y_true).astype(bool), probs))


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray, labels: list[str], min_positives: int) -> dict[str, Any]:
    """Decision thresholds chosen on labelled rows (validation): one global threshold (best macro F1 with
    every label at it), and per label the threshold of its best F1 where it has >= `min_positives` positive
    rows; rarer labels keep the global one. Ties go to the threshold nearest 0.5."""
    y = np.asarray(y_true).astype(bool)
    global_t = best_global_threshold(y, probs)
    per_label, own = {}, []
    for i, name in enumerate(labels):
        if y[:, i].sum() >= min_positives:
            on = probs[None, :, i] >= THRESHOLD_GRID[:, None]  # (thresholds, rows)
            col = y[None, :, i]
            tp, fp, fn = ((on & col).sum(1), (on & ~col).sum(1), (~on & col).sum(1))
            per_label[name] = best_on_grid(_f1(tp.astype(float), fp.astype(float), fn.astype(float)))
            own.append(name)
        else:
            per_label[name] = global_t
    return {"global": global_t, "per_label": per_label, "own_threshold": own, "min_positives": min_positives,
            "rule": "a label is on when its probability >= its threshold"}


def threshold_vector(thresholds: dict[str, Any], labels: list[str]) -> np.ndarray:
    return np.array([thresholds["per_label"].get(n, thresholds["global"]) for n in labels], dtype=np.float64)


# --- regression ---------------------------------------------------------------------------------------------


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation (scipy.stats.pearsonr's statistic); 0 when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties given their mean rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr's statistic)."""
    return pearson(average_ranks(a), average_ranks(b))


def regression_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Pearson, Spearman, MSE, RMSE, MAE (in the target's units) and the rows they cover."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    err = p - y
    mse = float((err * err).mean()) if len(y) else 0.0
    return {"rows": len(y), "pearson": pearson(y, p) if len(y) > 1 else 0.0, "spearman": spearman(y, p) if len(y) > 1 else 0.0,
            "mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.abs(err).mean()) if len(y) else 0.0}
