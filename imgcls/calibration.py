"""Calibration: how far confidence is from accuracy (ECE, reliability bins), and temperature scaling.

A classifier is calibrated when, of the images it answers with confidence p, a fraction p is right.
The expected calibration error is the standard one (Guo et al. 2017, "On Calibration of Modern
Neural Networks"): the top-class confidences go into 15 equal-width bins (i/15, (i+1)/15], and
ECE = sum over bins of |B| / n * |accuracy(B) - mean confidence(B)|.

Temperature scaling divides every logit by one T > 0, fitted on val by minimising the NLL. Division
by a positive number keeps the logits' order, so the predicted class never changes; predict ranks by
the unscaled logits all the same, so float rounding cannot tie two classes that differ.

`calibration.json`, written beside a checkpoint by `python -m imgcls.calibrate`, holds T and the
SHA-256 of the checkpoint file it was fitted for: `for_checkpoint` reads it, and ignores (with a
warning) one that belongs to other weights or another test-time augmentation.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from imgcls.checkpoint import atomic_write
from imgcls.provenance import file_sha256

BINS = 15
EDGES = tuple(i / BINS for i in range(BINS + 1))
FILE = "calibration.json"
# T is searched in [1/100, 100]: beyond it the probabilities are one-hot or uniform to float precision.
T_RANGE = (1e-2, 1e2)
LOG_T_RANGE = (math.log(T_RANGE[0]), math.log(T_RANGE[1]))


def reliability(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin (i/15, (i+1)/15] of top-class confidence: image count, summed confidence, correct count."""
    confidence, predicted = probs.double().max(1)
    index = torch.bucketize(confidence, torch.tensor(EDGES[1:-1], dtype=torch.float64))  # x in (e[i-1], e[i]] -> i
    zeros = torch.zeros(BINS, dtype=torch.float64)
    counts = torch.bincount(index, minlength=BINS)
    confidences = zeros.index_add(0, index, confidence)
    correct = zeros.index_add(0, index, (predicted == labels).double())
    return counts, confidences, correct


def ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Expected calibration error, 15 equal-width bins: sum |B|/n * |acc(B) - conf(B)|, which is
    sum |correct(B) - summed confidence(B)| / n."""
    if len(labels) == 0:
        return 0.0
    _, confidences, correct = reliability(probs, labels)
    return float((correct - confidences).abs().sum() / len(labels))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 80) -> float:
    """The T > 0 minimising NLL(logits / T): golden-section search on log T, in float64.

    NLL(b * z) is convex in b = 1/T (a log-sum-exp of lines minus a line), so it is unimodal in
    log T and the search is exact to the bracket; fixed steps make it deterministic. 80 steps
    shrink the bracket by 0.618**80, to about 1e-16 of its width.
    """
    z = logits.double()

    def cost(log_t: float) -> float:
        return nll(z, labels, math.exp(log_t))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_RANGE
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = cost(c), cost(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = cost(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = cost(d)
    return math.exp((a + b) / 2)


# ------------------------------------------------------------------------- calibration.json


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on val for one checkpoint file and one test-time augmentation."""

    temperature: float
    checkpoint: str  # the file's name, beside calibration.json
    checkpoint_sha256: str
    tta: str
    images: int  # val images it was fitted on
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits / self.temperature).softmax(1)


def fit(logits: torch.Tensor, labels: torch.Tensor, ckpt_path: Path, tta: str) -> Calibration:
    t = fit_temperature(logits, labels)
    return Calibration(
        temperature=t, checkpoint=ckpt_path.name, checkpoint_sha256=file_sha256(ckpt_path), tta=tta, images=len(labels),
        nll_before=nll(logits, labels), nll_after=nll(logits, labels, t),
        ece_before=ece(logits.softmax(1), labels), ece_after=ece((logits.double() / t).softmax(1), labels),
    )


def save(cal: Calibration, folder: Path) -> Path:
    path = folder / FILE
    atomic_write(path, json.dumps(asdict(cal), indent=2) + "\n")
    return path


def for_checkpoint(ckpt_path: str | Path, tta: str) -> Calibration | None:
    """The calibration beside a checkpoint, if it was fitted for this very file and this TTA.

    One fitted for other weights (the run retrained, last instead of best) or another TTA would give
    wrong probabilities: it is ignored with a warning on stderr, and predictions stay uncalibrated.
    """
    ckpt_path = Path(ckpt_path)
    path = ckpt_path.parent / FILE
    if not path.is_file():
        return None
    try:
        cal = Calibration(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        print(f"warning: {path} ignored: not a calibration file ({e}); run python -m imgcls.calibrate again", file=sys.stderr)
        return None
    if cal.checkpoint_sha256 != file_sha256(ckpt_path):
        print(
            f"warning: {path} ignored: it was fitted for other weights ({cal.checkpoint}, SHA-256 "
            f"{cal.checkpoint_sha256[:12]}...), not {ckpt_path}; run python -m imgcls.calibrate again",
            file=sys.stderr,
        )
        return None
    if cal.tta != tta:
        print(f"warning: {path} ignored: fitted with tta = {cal.tta!r}, predicting with {tta!r}", file=sys.stderr)
        return None
    return cal

