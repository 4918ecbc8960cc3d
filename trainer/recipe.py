"""What the recipe decides from the data and from the clock (no torch here; the loop in train.py asks).

- `auto_epochs`: `train.epochs: auto`. Many labels with few rows each need more passes than a big set of a
  few labels: two epochs left a 77-class, 10k-row intent task underfit (training loss still falling) while
  they are enough for AG News (4 labels, 19k rows). The rule: enough passes that each label is seen about
  PRESENTATIONS_PER_LABEL times on average, at least 2 and at most 20 epochs; early stopping
  (AUTO_PATIENCE epochs without improvement) keeps the best adapter, so extra epochs cost time, not accuracy.
- `budget_steps`: `train.time_budget_minutes`. The most optimizer steps that fit the budget, given the
  measured seconds per step, per evaluation and per checkpoint, and where evaluations and checkpoints fall.
- `class_weights`: `train.class_weights: auto`, inverse label frequency, capped.
- `head_lr_scale`: `train.head_lr_scale: auto`, the head at 5x the LoRA rate with more than 10 labels.
- `lr_factor`: the warmup + decay schedule as a function of the *current* total, so a total fixed by the
  budget after the first steps reshapes the schedule to end where the run ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRESENTATIONS_PER_LABEL = 1000
AUTO_MIN_EPOCHS = 2
AUTO_MAX_EPOCHS = 20
AUTO_PATIENCE = 3  # epochs without improvement


def auto_patience(steps_per_epoch: int, eval_every: int) -> tuple[int, str]:
    """`train.patience: auto` with `epochs: auto`: AUTO_PATIENCE epochs' worth of evaluations (patience
    counts evaluations; with train.eval_every an epoch holds several)."""
    per_epoch = math.ceil(steps_per_epoch / eval_every) if 0 < eval_every < steps_per_epoch else 1
    return AUTO_PATIENCE * per_epoch, f"{AUTO_PATIENCE} epochs without improvement ({per_epoch} evaluations per epoch)"


def auto_epochs(rows: int, label_counts: np.ndarray) -> tuple[int, str]:
    """(epochs, why) for `rows` training rows with `label_counts[i]` rows of label i."""
    present = label_counts[label_counts > 0]
    k = len(present)
    wanted = math.ceil(PRESENTATIONS_PER_LABEL * k / max(rows, 1))
    epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, wanted))
    if k == 1:  # a regression target (one output): the rule counts it as one label
        return epochs, (f"{rows:,} training rows, one target: {epochs} epochs (rule: about {PRESENTATIONS_PER_LABEL:,} "
                        f"presentations per output, ceil({PRESENTATIONS_PER_LABEL:,} / {rows:,}) = {wanted}, kept within "
                        f"{AUTO_MIN_EPOCHS}..{AUTO_MAX_EPOCHS})")
    why = (f"{rows:,} training rows, {k} labels (median {float(np.median(present)):.0f} rows per label, fewest "
           f"{int(present.min())}): {epochs} epochs (rule: enough passes for about {PRESENTATIONS_PER_LABEL:,} "
           f"presentations per label on average, ceil({PRESENTATIONS_PER_LABEL:,} x {k} / {rows:,}) = {wanted}, "
           f"kept within {AUTO_MIN_EPOCHS}..{AUTO_MAX_EPOCHS})")
    return epochs, why


@dataclass
class Costs:
    """Measured so far in this run's loop (seconds)."""

    step: float  # one optimizer step
    evaluation: float  # one validation pass (with saving the adapter when best)
    checkpoint: float  # one save_state


def events(done: int, total: int, steps_per_epoch: int, every: int) -> int:
    """Steps in (done, total] that are epoch ends, multiples of `every` (0 = none), or the last step."""
    marks = set(range((done // steps_per_epoch + 1) * steps_per_epoch, total + 1, steps_per_epoch))
    if every > 0:
        marks |= set(range((done // every + 1) * every, total + 1, every))
    if total > done:
        marks.add(total)
    return len(marks)


def budget_steps(budget_s: float, elapsed_s: float, done: int, cap: int, costs: Costs, steps_per_epoch: int,
                 eval_every: int, save_every: int) -> int:
    """The largest total number of steps, from done + 1 to cap, whose remaining steps, evaluations and
    checkpoints fit in what is left of the budget (done + 1 when not even one more step fits)."""

    def seconds(total: int) -> float:
        evals = events(done, total, steps_per_epoch, eval_every)
        saves = events(done, total, steps_per_epoch, save_every)
        return elapsed_s + (total - done) * costs.step + evals * costs.evaluation + saves * costs.checkpoint

    lo, hi = done + 1, max(cap, done + 1)
    if seconds(hi) <= budget_s:
        return hi
    while lo < hi:  # seconds() grows with total: the last total that fits
        mid = (lo + hi + 1) // 2
        if seconds(mid) <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def lr_factor(step: float, total: int, warmup_ratio: float, kind: str) -> float:
    """Learning-rate multiplier after `step` optimizer steps of `total`; the same values as transformers'
    linear / cosine / constant_with_warmup schedules for a fixed total."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return step / max(1, warm)
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


MAX_CLASS_WEIGHT = 10.0


def class_weights(label_counts: np.ndarray) -> np.ndarray:
    """Inverse label frequency, rows / (labels x rows of the label) (scikit-learn's "balanced"), at most
    MAX_CLASS_WEIGHT so a label with a handful of rows does not dominate; labels without rows get 1."""
    present = label_counts > 0
    weights = np.ones(len(label_counts), dtype=np.float64)
    weights[present] = label_counts.sum() / (present.sum() * label_counts[present])
    return np.minimum(weights, MAX_CLASS_WEIGHT)


# Measured (benchmarks/recipe.py, single seed, validation / test accuracy, head at 5x vs 1x): TREC fine, 50
# labels: 0.924 / 0.916 vs 0.881 / 0.864 (macro F1 0.73 vs 0.60); AG News, 4 labels, 5-minute budget:
# 0.923 / 0.906 vs 0.912 / 0.906; TREC coarse, 6 labels: 0.929 / 0.968 vs 0.944 / 0.970. Many labels gain
# clearly; few labels do not consistently, so they keep the head at the LoRA rate.
AUTO_HEAD_LR_SCALE = 5.0
AUTO_HEAD_LR_MIN_LABELS = 11


def head_lr_scale(setting: float | str, labels: int) -> tuple[float, str]:
    """The head's learning-rate multiplier and why (summary.json)."""
    if setting != "auto":
        return float(setting), "train.head_lr_scale"
    if labels >= AUTO_HEAD_LR_MIN_LABELS:
        return AUTO_HEAD_LR_SCALE, (f"{labels} labels: a head trained from scratch over many labels learns at "
                                    f"{AUTO_HEAD_LR_SCALE:g}x (more than {AUTO_HEAD_LR_MIN_LABELS - 1} labels)")
    return 1.0, f"{labels} labels: the head learns at the LoRA rate ({AUTO_HEAD_LR_MIN_LABELS - 1} labels or fewer)"



MAX_POS_WEIGHT = 10.0


def pos_weights(positives: np.ndarray, rows: int) -> np.ndarray:
    """Multi-label `train.pos_weight: auto`: negatives / positives per label, capped at MAX_POS_WEIGHT (a label
    with few positives would otherwise dominate the loss); 1 for a label without positives."""
    pos = positives.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(pos > 0, (rows - pos) / np.where(pos > 0, pos, 1), 1.0)
    return np.clip(w, 1.0, MAX_POS_WEIGHT)
