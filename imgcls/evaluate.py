"""Evaluation: logits for a split under inference mode, then the metrics people compare runs by.

`python -m imgcls.evaluate EXP CKPT [--split val|test]` prints a checkpoint's metrics on a split.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.train import autocast


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    loader,
    prepare_input: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on the CPU) and labels of a loader, in the loader's order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with autocast(device, precision):
            logits = model(prepare_input(images))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss (plain cross-entropy), accuracy, macro-F1, per-class P/R/F1 and the confusion matrix.

    Classes absent from the split still get a row, so matrices of different splits line up.
    """
    # Imported here: sklearn takes ~1.9 s to import, which predict (loading this module via run) never needs.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = labels.numpy()
    y_pred = logits.argmax(1).numpy()
    ids = list(range(len(classes)))
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    present = support > 0
    return {
        "images": int(len(y_true)),
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def text_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    from sklearn.metrics import classification_report

    return classification_report(
        labels.numpy(), logits.argmax(1).numpy(), labels=list(range(len(classes))), target_names=classes,
        digits=4, zero_division=0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment TOML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="a .safetensors checkpoint from a run directory")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which split to evaluate")
    parser.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    args = parser.parse_args(argv)
    from imgcls.run import evaluate_checkpoint, guarded

    def go() -> int:
        metrics = evaluate_checkpoint(args.experiment, args.checkpoint, args.split)
        if args.json:
            print(json.dumps(metrics, indent=2))
        else:
            print(
                f"{args.split}: {metrics['images']} images  accuracy {metrics['accuracy']:.4f}  "
                f"macro-F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}"
            )
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
