"""Report: the files a person reads after a run (history.csv, metrics.json, plots, text report)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

from imgcls.checkpoint import atomic_write

# No wall-clock column: identical runs write identical files (seconds go to timings.json).
# `weights`: SHA-256 of the model's tensors after the epoch, so `verify` can name the first epoch that differs.
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr", "weights"]


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue())


def write_predictions(path: Path, paths: list[str], logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    """One row per image: path (relative to its split's folder), true and predicted class, the
    predicted class's probability and the true class's, in the split's file order."""
    probs = logits.softmax(1)
    predicted = logits.argmax(1)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", "p_predicted", "p_true"])
    for name, p, y, y_hat in zip(paths, probs.tolist(), labels.tolist(), predicted.tolist()):
        writer.writerow([name, classes[y], classes[y_hat], f"{p[y_hat]:.6f}", f"{p[y]:.6f}"])
    atomic_write(path, buf.getvalue())


def _pyplot():
    """matplotlib, imported on first plot: it costs ~0.5 s that predict and evaluate never need."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, history: list[dict[str, float]], best_epoch: int) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="val")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str], title: str) -> None:
    n = len(classes)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = _pyplot().subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def summary_line(epoch: int, epochs: int, row: dict[str, float], seconds: float, is_best: bool) -> str:
    return (
        f"epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} macro-F1 {row['val_macro_f1']:.3f}  lr {row['lr']:.2e}  "
        f"{seconds:.1f}s{'  *best' if is_best else ''}"
    )


def print_preflight(rep: dict[str, Any]) -> None:
    """What the preflight found, before the first epoch: classes, split sizes, skipped files, warnings."""
    lines = [f"classes ({len(rep['classes'])}): {', '.join(rep['classes'])}"]
    for name, split in rep["splits"].items():
        skipped = sum(split["skipped_files"].values())
        how = rep.get("transforms", {}).get(name)
        lines.append(
            f"{name}: {split['images']} images"
            + (f", {skipped} non-image files skipped" if skipped else "")
            + (f", {how.replace('_', '-')} transforms" if how else "")
        )
    lines += [f"skipped unreadable: {b}" for b in rep["bad_images"]]
    lines += [f"warning: {w}" for w in rep["warnings"]]
    print("\n".join(lines), file=sys.stderr)
