"""The one place that knows the task: how logits become probabilities, predictions and metrics, and how a
changed model (int8) is judged against its reference (fp32). Torch-free; the export gate, the int8 search,
serve_cli (files, HTTP, Ray) and evaluation all ask here.

- single_label: softmax over the labels; the prediction is the most probable label.
- multi_label: a sigmoid per label; a label is on when its probability >= its threshold (chosen on
  validation by the trainer, stored in the model's config.json as `loraship_thresholds`); a row may have
  none.
- regression: one output, trained on targets scaled to mean 0 and standard deviation 1; the scale (the
  training targets' mean and standard deviation, `loraship_target` in config.json) turns it back into the
  data's units here, so every path (torch, ONNX, files, HTTP, Ray) answers in those units. The "probs" of a
  regression model are its scores, one column.

Inputs: one text, or a pair (`loraship_inputs` names the fields the model was trained on; a pair is encoded
as the tokenizer's pair, `[CLS] a [SEP] b [SEP]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loraship.metrics import (
    classification_report,
    decide,
    multilabel_report,
    pearson,
    regression_report,
    threshold_vector,
)

SINGLE, MULTI, REGRESSION = "single_label", "multi_label", "regression"
PROBLEM_TYPES = {SINGLE: "single_label_classification", MULTI: "multi_label_classification", REGRESSION: "regression"}
THRESHOLDS_KEY = "loraship_thresholds"  # in config.json of merged and ONNX dirs
TARGET_KEY = "loraship_target"  # regression: {"name", "mean", "std"} of the training targets
INPUTS_KEY = "loraship_inputs"  # {"text": field, "text_pair": field or null}: what the model was trained on
CHANGE_OF_SPREAD = 0.05  # regression: a score moved by more than this share of the target's std "changed"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass
class Task:
    name: str
    labels: list[str]  # regression: the target's name (one output)
    thresholds: dict[str, Any] | None = None  # multi_label
    target: dict[str, Any] | None = None  # regression: {"name", "mean", "std"}
    inputs: dict[str, str | None] | None = None  # {"text": field, "text_pair": field or None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Task:
        """The task of an exported model from its config.json."""
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        inputs = config.get(INPUTS_KEY)
        if config.get("problem_type") == PROBLEM_TYPES[MULTI]:
            thresholds = config.get(THRESHOLDS_KEY) or {"global": 0.5, "per_label": {}}
            return cls(MULTI, labels, thresholds, inputs=inputs)
        if config.get("problem_type") == PROBLEM_TYPES[REGRESSION]:
            target = config.get(TARGET_KEY) or {"name": labels[0], "mean": 0.0, "std": 1.0}
            return cls(REGRESSION, labels, target=target, inputs=inputs)
        return cls(SINGLE, labels, inputs=inputs)

    @property
    def multi(self) -> bool:
        return self.name == MULTI

    @property
    def regression(self) -> bool:
        return self.name == REGRESSION

    @property
    def pair(self) -> bool:
        """Whether the model reads a pair of texts."""
        return bool(self.inputs and self.inputs.get("text_pair"))

    @property
    def headline(self) -> str:
        """The metric a model of this task is judged by first (regression: Pearson, SICK-R's and STS-B's)."""
        return "f1_macro" if self.multi else "pearson" if self.regression else "accuracy"

    @property
    def headline_keys(self) -> tuple[str, ...]:
        """The figures reports show for this task."""
        if self.regression:
            return ("pearson", "spearman", "mse", "mae")
        return ("accuracy", "f1_weighted", "f1_macro") + (("f1_micro", "f1_samples") if self.multi else ())

    def cut(self, override: float | None = None) -> np.ndarray:
        """Per-label decision thresholds (multi_label); `override` puts every label at one threshold."""
        assert self.thresholds is not None
        if override is not None:
            return np.full(len(self.labels), override)
        return threshold_vector(self.thresholds, self.labels)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities (classification) or scores in the data's units, one column (regression)."""
        if self.regression:
            assert self.target is not None
            return (logits[:, :1].astype(np.float64) * self.target["std"] + self.target["mean"]).astype(np.float32)
        return sigmoid(logits) if self.multi else softmax(logits)

    def predict(self, probs: np.ndarray, override: float | None = None) -> np.ndarray:
        """Label ids (single_label), a 0/1 matrix of labels on (multi_label), or scores (regression)."""
        if self.regression:
            return probs[:, 0]
        return decide(probs, self.cut(override)) if self.multi else probs.argmax(-1)

    def metrics(self, y: np.ndarray, probs: np.ndarray, override: float | None = None) -> dict[str, Any]:
        pred = self.predict(probs, override)
        if self.regression:
            return regression_report(y, pred)
        return multilabel_report(y, pred, self.labels) if self.multi else classification_report(y, pred, self.labels)

    def changed(self, ref: np.ndarray, probs: np.ndarray) -> int:
        """Rows whose prediction differs from the reference's (multi_label: label decisions that differ;
        regression: scores that moved by more than CHANGE_OF_SPREAD of the target's standard deviation)."""
        a, b = self.predict(ref), self.predict(probs)
        if self.regression:
            assert self.target is not None
            return int((np.abs(a - b) > CHANGE_OF_SPREAD * self.target["std"]).sum())
        return int((a != b).sum())

    def expected_drop(self, ref: np.ndarray, probs: np.ndarray) -> float:
        """Points of the headline metric lost against the reference's probabilities taken as soft labels. Needs
        no labels, so it runs over thousands of texts, and counts each change by how sure the reference was.

        single_label: accuracy (a flip where the reference was sure costs nearly a row).
        multi_label: micro F1 of the decisions against soft truth, 2 sum(P D) / (sum P + sum D): normalised by
        the positives, so flips of rare positives are not drowned by the many negatives."""
        if not len(ref):
            return 0.0
        if self.regression:
            # Pearson points lost if the reference's scores were the truth: an upper bound on the Pearson
            # the change costs against real targets when its error is independent of them.
            return 100 * (1 - pearson(ref[:, 0], probs[:, 0])) if len(ref) > 1 else 0.0
        if self.multi:
            def soft_f1(d: np.ndarray) -> float:
                denom = ref.sum() + d.sum()
                return float(2 * (ref * d).sum() / denom) if denom else 1.0

            return 100 * (soft_f1(self.predict(ref)) - soft_f1(self.predict(probs)))
        pred = probs.argmax(-1)
        return float(100 * np.mean(ref.max(-1) - ref[np.arange(len(pred)), pred]))

    def labelled_tolerance(self, changed: int, y: np.ndarray) -> float:
        """Two standard errors of a labelled headline drop, in points: each changed row (decision) turns right
        or wrong about as a coin does, so the net count wanders by sqrt(changed). Per row for accuracy; per
        positive for multi-label F1. Regression: none; a Pearson difference between two nearly equal
        predictors on the same rows is not a count of coin flips, and the expected drop bounds it."""
        if self.regression:
            return 0.0
        scale = max(int(np.asarray(y).sum()) if self.multi else len(y), 1)
        return 200 * float(np.sqrt(changed)) / scale

    def row_output(self, probs: np.ndarray, k: int, override: float | None = None) -> dict[str, Any]:
        """One row as serve_cli writes it: single_label `label`, `score`, `top_k`; multi_label `labels` (on,
        possibly none) and `scores` (every label's probability); regression `score` (in the data's units)."""
        if self.regression:
            return {"score": round(float(probs[0]), 6)}
        if self.multi:
            on = self.predict(probs[None, :], override)[0]
            return {"labels": [n for n, x in zip(self.labels, on, strict=True) if x],
                    "scores": {n: round(float(p), 6) for n, p in zip(self.labels, probs, strict=True)}}
        idx = np.argsort(-probs)[:k]
        best = [{"label": self.labels[i], "score": round(float(probs[i]), 6)} for i in idx]
        return {"label": best[0]["label"], "score": best[0]["score"], "top_k": best}
