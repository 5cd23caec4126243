"""Evaluation: the one forward pass behind every "what are this image's logits", and the metrics.

Training's validation, `evaluate` and `predict` all call `forward`, so the three answer with one
numeric path (autocast included) and cannot drift apart.

`python -m imgcls.evaluate EXP CKPT [--split val|test]` prints a checkpoint's metrics on a split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from imgcls import checkpoint, config, data, models, report, runtime
from imgcls.errors import CheckpointError, ConfigError, guarded


@torch.inference_mode()
def forward(net: nn.Module, images: torch.Tensor, inputs: runtime.Inputs) -> torch.Tensor:
    """Logits (float32, on the CPU) of one batch, with the network in eval mode."""
    net.eval()
    with inputs.autocast():
        logits = net(inputs.prepare(images))
    return logits.float().cpu()


def logits_of(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], inputs: runtime.Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, in the loader's order."""
    all_logits, all_labels = [], []
    for images, labels in batches:
        all_logits.append(forward(net, images, inputs))
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss (plain cross-entropy), accuracy, macro-F1, per-class P/R/F1 and the confusion matrix.

    Classes absent from the split still get a row, so matrices of different splits line up.
    """
    # Imported here: sklearn takes ~1.9 s to import, which predict never needs.
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
        labels.numpy(), logits.argmax(1).numpy(), labels=list(range(len(classes))),
        target_names=[report.display_name(c) for c in classes],  # a text file: one line per class, valid UTF-8
        digits=4, zero_division=0,
    )


# ----------------------------------------------------------------------- a trained model for inference


@dataclass
class Trained:
    """A checkpoint's model in eval mode, with the experiment and classes it was trained with."""

    exp: config.Experiment
    model: nn.Module
    classes: list[str]
    inputs: runtime.Inputs


def load_for_inference(exp_path: str, ckpt_path: str) -> Trained:
    """Experiment + checkpoint -> model in eval mode.

    The checkpoint is the source of truth for what decides predictions (config.PREDICTION_KEYS):
    an experiment that differs from it in any of them is refused, naming the keys. The experiment
    still says where the data is and which device to use.
    """
    exp = config.load(exp_path)
    saved = checkpoint.load(ckpt_path)
    trained = saved.experiment(ckpt_path)
    changed = [k for k in config.changed_keys(trained, exp) if config.changes_predictions(k)]
    if changed:
        raise CheckpointError(
            f"{ckpt_path} was trained with other settings than {exp_path} in keys that change predictions:\n"
            + config.describe_changes(trained, exp, changed, ("checkpoint", "experiment"))
            + "\nuse the experiment the checkpoint came from (its run directory's config.toml)"
        )
    _check_classes(exp, saved.classes, ckpt_path)
    device = runtime.resolve_device(exp.device, exp.train.precision)
    model = models.build(models.untrained(trained.model), len(saved.classes), device, trained.train.channels_last)
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit model {trained.model.arch!r}: {e}") from None
    model.eval()
    return Trained(exp, model, saved.classes, data.inputs(trained, device))


def _check_classes(exp: config.Experiment, classes: list[str], ckpt_path: str) -> None:
    if not Path(exp.data.train_dir).is_dir():
        return  # predicting away from the training data: the checkpoint's class names are all there is
    classes_now = data.scan_classes(exp.data.train_dir)
    if classes_now != classes:
        raise CheckpointError(
            f"{ckpt_path} knows classes {classes}, but {exp.data.train_dir} has {classes_now}: "
            f"missing from the checkpoint {sorted(set(classes_now) - set(classes))}, "
            f"extra in it {sorted(set(classes) - set(classes_now))}"
        )


def split_logits(trained: Trained, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Paths, logits and labels of a split, through the same decode and eval loader as training."""
    exp = trained.exp
    root = exp.data.val_dir if split == "val" else exp.data.test_dir
    if root is None:
        raise ConfigError("experiment", ["data.test_dir is not set, so there is no test split to evaluate"])
    images = data.scan_split(split, root, trained.classes)
    decoded, failures = data.decode_split(images, exp.data, progress=False)
    for f in failures:
        print(f"skipped: {f}", file=sys.stderr)
    logits, labels = logits_of(trained.model, data.split_loader(exp, images, decoded), trained.inputs)
    return images.paths, logits, labels


def evaluate_checkpoint(exp_path: str, ckpt_path: str, split: str, predictions: Path | None = None) -> dict[str, Any]:
    """A checkpoint's metrics on a split; with `predictions`, also the per-image CSV a run writes."""
    trained = load_for_inference(exp_path, ckpt_path)
    paths, logits, labels = split_logits(trained, split)
    if predictions is not None:
        root = trained.exp.data.val_dir if split == "val" else trained.exp.data.test_dir
        relative = [os.path.relpath(p, root) for p in paths]
        report.write_predictions(predictions, relative, logits, labels, trained.classes)
    return compute_metrics(logits, labels, trained.classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment TOML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="a .safetensors checkpoint from a run directory")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which split to evaluate")
    parser.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    parser.add_argument(
        "--predictions", type=Path, metavar="CSV", help="also write per-image predictions, as a run's predictions_<split>.csv"
    )
    args = parser.parse_args(argv)

    def go() -> int:
        metrics = evaluate_checkpoint(args.experiment, args.checkpoint, args.split, args.predictions)
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
