"""Classification metrics from a confusion matrix, shared by `gptlab eval --task classification` and the
validation of classification fine-tuning.

    accuracy    trace / total
    per class   precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), support = TP + FN;
                0 where undefined (scikit-learn's zero_division=0)
    macro_f1    unweighted mean of the per-class F1
"""

from __future__ import annotations

from collections.abc import Sequence


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], k: int) -> list[list[int]]:
    """(k, k) counts: row = true class, column = predicted class."""
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    return confusion


def classification_report(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> dict:
    """accuracy, per-class precision / recall / F1 / support, macro F1, and the confusion matrix itself."""
    k = len(labels)
    total = sum(map(sum, confusion))
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c][c]
        fp = sum(confusion[r][c] for r in range(k)) - tp
        fn = sum(confusion[c]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return {
        "accuracy": sum(confusion[c][c] for c in range(k)) / total if total else 0.0,
        "macro_f1": sum(s["f1"] for s in per_class.values()) / k,
        "labels": list(labels), "per_class": per_class, "confusion": [list(map(int, row)) for row in confusion],
    }
