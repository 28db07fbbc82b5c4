"""Classification metrics on clip scores: accuracy and macro-F1 (single-label), mAP (multi-label)."""

from __future__ import annotations

import numpy as np


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """scores [N, C]; targets [N] class indices."""
    return float((scores.argmax(1) == targets).mean())


def confusion(scores: np.ndarray, targets: np.ndarray, classes: int) -> np.ndarray:
    """[C, C]: row = true class, column = predicted."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (targets, scores.argmax(1)), 1)
    return matrix


def f1_per_class(matrix: np.ndarray) -> np.ndarray:
    tp = np.diag(matrix).astype(float)
    denominator = matrix.sum(0) + matrix.sum(1)  # predicted + actual = 2 tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean F1 over the classes that occur in targets or predictions."""
    matrix = confusion(scores, targets, scores.shape[1])
    present = (matrix.sum(0) + matrix.sum(1)) > 0
    return float(f1_per_class(matrix)[present].mean())


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve of one class (sklearn's step-wise definition);
    NaN when the class has no positives."""
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(float)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    # ties share one threshold: keep the precision at the last of each run of equal scores
    last = np.r_[np.diff(scores[order]) != 0, True]
    recall_step = np.diff(np.r_[0.0, np.cumsum(hits)[last]]) / hits.sum()
    return float((precision[last] * recall_step).sum())


def ap_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores [N, C]; targets [N, C] multi-hot."""
    return np.array([average_precision(scores[:, c], targets[:, c] > 0.5) for c in range(scores.shape[1])])

