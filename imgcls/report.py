r"""Report: the files a person reads after a run (history.csv, metrics.json, plots, text report).

Class and file names are whatever a file system allows: any character, any length, and on Linux
bytes that are not UTF-8 (which Python holds as lone surrogates). Each output keeps them as far
as its format can:
- JSON (metrics.json, preflight.json, predict --json) holds every name exactly: ASCII with \u
  escapes, a non-UTF-8 byte as its surrogate escape \udcNN, which Python's json reads back to
  the same name.
- CSV and text files are valid UTF-8: a non-UTF-8 byte is written \xNN (`text_safe`), every other
  character as it is (CSV quotes line breaks).
- Plots and terminal lines show `display_name`: non-printable characters as backslash escapes, and
  in plots past LABEL_CHARS characters cut with an ellipsis; `$` is never read as mathtext.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import sys
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, TextIO

import numpy as np
import torch

from imgcls import calibration
from imgcls.checkpoint import atomic_write

# No wall-clock column: identical runs write identical files (seconds go to timings.json).
# `weights`: SHA-256 of the model's tensors after the epoch, so `verify` can name the first epoch that differs.
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr", "weights"]


# ------------------------------------------------------------------------------------------ names

# Python holds a file name's bytes that are not UTF-8 as lone surrogates U+DC80..U+DCFF (PEP 383).
_SURROGATE = re.compile("[\ud800-\udfff]")
LABEL_CHARS = 40  # a longer tick label would take the plot's width from the matrix


def _escape_surrogate(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def text_safe(name: str) -> str:
    """`name` as valid Unicode: a file-name byte that is not UTF-8 becomes `\\xNN`, any other lone
    surrogate `\\uXXXX`; every other character stays as it is."""
    return _SURROGATE.sub(_escape_surrogate, name)


def display_name(name: str, limit: int | None = None) -> str:
    """`name` for a person to read in a plot or on a terminal: `text_safe`, then each non-printable
    character (control, line break, format characters such as a right-to-left override) as its
    backslash escape, then cut to `limit` characters with an ellipsis."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text_safe(name))
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "\u2026"
    return text


def html_text(value: Any) -> str:
    """Any value from a run as HTML text: `display_name` (each character a person could not see, or
    that would reorder the line, as its escape), then HTML-escaped, quotes included."""
    return html.escape(display_name(str(value)), quote=True)


def plot_labels(names: list[str]) -> list[str]:
    """Distinct plot labels: `display_name` cut to LABEL_CHARS, and where two labels still look the
    same (a common long prefix, or é as one character and as e + accent) each gets its class number."""
    labels = [display_name(n, LABEL_CHARS) for n in names]
    seen = Counter(unicodedata.normalize("NFC", label) for label in labels)  # NFC: what looks alike is alike
    return [
        label if seen[unicodedata.normalize("NFC", label)] == 1 else f"{display_name(name, LABEL_CHARS - len(f' #{i}'))} #{i}"
        for i, (name, label) in enumerate(zip(names, labels))
    ]


# ------------------------------------------------------------------------------------------ files


def write_json(path: Path, data: Any) -> None:
    # ensure_ascii (json's default) keeps any name exact, a non-UTF-8 byte as \udcNN: see the module docstring.
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=True) + "\n")


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
    rows = [["path", "true", "predicted", "p_predicted", "p_true"]]
    for name, p, y, y_hat in zip(paths, probs.tolist(), labels.tolist(), predicted.tolist()):
        rows.append([name, classes[y], classes[y_hat], f"{p[y_hat]:.6f}", f"{p[y]:.6f}"])
    write_csv(buf, rows)
    atomic_write(path, buf.getvalue())


def write_csv(out: TextIO, rows: Iterable[list[str]]) -> None:
    """Rows of names as CSV lines ending in a line feed, each field `text_safe`. Python 3.11's writer leaves
    a field holding a carriage return unquoted (readers then split the row there): such a row is quoted whole."""
    plain = csv.writer(out, lineterminator="\n")
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        fields = [text_safe(field) for field in row]
        (quoted if any("\r" in field for field in fields) else plain).writerow(fields)


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
    _save(fig, path)


# A confusion matrix shows every cell, with its count, up to this many classes. Its cost grows with
# the square of the class count (300 classes took 136 s and 9.5 GB, and wrote a PNG Pillow refused):
# past the limit only the classes of the largest confusions are drawn; every count is in metrics.json.
MAX_PLOT_CLASSES = 30
MAX_FIGURE_INCHES = 20  # at DPI, no plot is wider or taller than 2000 pixels
DPI = 100


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str], title: str) -> None:
    counts = np.asarray(matrix, dtype=np.int64).reshape(len(classes), len(classes))
    shown = list(range(len(classes)))
    if len(classes) > MAX_PLOT_CLASSES:
        shown = confused_classes(counts, MAX_PLOT_CLASSES)
        title += f"\n{len(shown)} of {len(classes)} classes: those of the largest confusions (all counts: metrics.json)"
    counts = counts[np.ix_(shown, shown)]
    n = len(shown)
    labels = plot_labels([classes[i] for i in shown])
    # Half an inch a cell, plus room for the longest tick label (~0.09 inch a character at 10 points).
    size = min(max(4.0, 0.55 * n + 2 + 0.09 * max(map(len, labels), default=0)), MAX_FIGURE_INCHES - 1)
    fig, ax = _pyplot().subplots(figsize=(size + 1, size))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    # parse_math=False: a `$` in a class name is a dollar sign, never the start of mathtext.
    ax.set_xticks(range(n), labels, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(n), labels, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    peak = int(counts.max(initial=0))
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black", fontsize=8)
    _save(fig, path)


def plot_reliability(path: Path, probs: torch.Tensor, labels: torch.Tensor, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration,
    the gap to it shaded, the share of images per bin below; the ECE in the title."""
    counts, confidences, correct = calibration.reliability(probs, labels)
    filled = counts > 0
    edges = np.asarray(calibration.EDGES)
    width = edges[1] - edges[0]
    accuracy = np.where(filled, (correct / counts.clamp(min=1)).numpy(), 0.0)
    mean_conf = np.where(filled, (confidences / counts.clamp(min=1)).numpy(), np.nan)
    fig, (ax, ax_n) = _pyplot().subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    gap = np.nan_to_num(mean_conf - accuracy)
    ax.bar(edges[:-1], gap, bottom=accuracy, width=width, align="edge", color="red", alpha=0.3, label="gap to confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(f"{title}\nECE {calibration.ece(probs, labels):.4f} ({calibration.BINS} bins, {len(labels)} images)", parse_math=False)
    ax.legend(loc="upper left")
    ax_n.bar(edges[:-1], (counts / max(len(labels), 1)).numpy(), width=width, align="edge", edgecolor="black")
    ax_n.set(xlabel="confidence (top-class probability)", ylabel="share of images")
    _save(fig, path)


def confused_classes(counts: np.ndarray, limit: int) -> list[int]:
    """Up to `limit` class indices, in class order: both classes of each of the largest off-diagonal
    counts (true, predicted), largest first; then, while there is room, the classes with most errors."""
    n = len(counts)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    chosen: dict[int, None] = {}
    for flat in np.argsort(-off, axis=None, kind="stable"):
        if len(chosen) >= limit or off.flat[flat] == 0:
            break
        for c in divmod(int(flat), n):
            if len(chosen) < limit:
                chosen.setdefault(c)
    for c in np.argsort(-off.sum(1), kind="stable"):
        if len(chosen) >= limit:
            break
        chosen.setdefault(int(c))
    return sorted(chosen)


def _save(fig, path: Path) -> None:
    """Lay the figure out and write it as a PNG of exactly its size (no bbox cropping or growing)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A name in a script the plot font lacks draws as boxes; its exact text is in metrics.json.
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
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
    lines = [f"classes ({len(rep['classes'])}): {', '.join(display_name(c) for c in rep['classes'])}"]
    for name, split in rep["splits"].items():
        skipped = sum(split["skipped_files"].values())
        how = rep.get("transforms", {}).get(name)
        lines.append(
            f"{name}: {split['images']} images"
            + (f", {skipped} non-image files skipped" if skipped else "")
            + (f", {how}" if how else "")
        )
    lines += [f"skipped unreadable: {b}" for b in rep["bad_images"]]
    lines += [f"warning: {w}" for w in rep["warnings"]]
    print("\n".join(lines), file=sys.stderr)
