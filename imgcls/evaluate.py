"""Evaluation: the one forward pass behind every "what are this image's logits", and the metrics.

Training's validation, `evaluate` and `predict` all call `forward`, so the three answer with one
numeric path (autocast and test-time augmentation included) and cannot drift apart.

`python -m imgcls.evaluate EXP CKPT [--split val|test] [--tta none|flip]` prints a checkpoint's
metrics on a split, its ECE before and after the temperature `python -m imgcls.calibrate` fitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, assert_never

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from imgcls import calibration, checkpoint, config, data, distributed, models, report, runtime
from imgcls.errors import CheckpointError, ConfigError, guarded


@torch.inference_mode()
def forward(net: nn.Module, images: torch.Tensor, inputs: runtime.Inputs, tta: config.Tta = "none") -> torch.Tensor:
    """Logits (float32, on the CPU) of one batch of (N, C, H, W) images, with the network in eval mode.

    tta = "flip": the mean of the logits of the images and of their horizontal mirrors. Logits, not
    probabilities, are averaged, so the result is again one set of logits: loss, ECE and temperature
    scaling apply to it unchanged. Two passes, not one batch twice the size, so each half has the
    bits a plain pass over the same images would have.
    """
    net.eval()
    logits = _pass(net, images, inputs)
    match tta:
        case "none":
            return logits
        case "flip":
            return (logits + _pass(net, images.flip(-1), inputs)) / 2
        case _:
            assert_never(tta)


def _pass(net: nn.Module, images: torch.Tensor, inputs: runtime.Inputs) -> torch.Tensor:
    with inputs.autocast():
        logits = net(inputs.prepare(images))
    return logits.float().cpu()


def logits_of(
    net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], inputs: runtime.Inputs, tta: config.Tta = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, in the loader's order."""
    all_logits, all_labels = [], []
    for images, labels in batches:
        all_logits.append(forward(net, images, inputs, tta))
        all_labels.append(labels)
    if not all_logits:  # a rank whose shard of a small split is empty
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)  # 1-D empty: torch.cat skips it
    return torch.cat(all_logits), torch.cat(all_labels)


def split_logits_of(
    net: nn.Module, loader: DataLoader, inputs: runtime.Inputs, world: distributed.World, tta: config.Tta = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a split in file order, however many processes share it: each rank
    scores its own shard (no image twice, none padded in), and the shards are gathered with their
    image indices, so every rank holds exactly the split's logits."""
    logits, labels = logits_of(net, loader, inputs, tta)
    if not world.distributed:
        return logits, labels
    shards = world.gather((loader.batch_sampler.shard(), logits, labels))
    order = torch.tensor([i for indices, _, _ in shards for i in indices]).argsort()
    return torch.cat([lg for _, lg, _ in shards])[order], torch.cat([lb for _, _, lb in shards])[order]


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Loss (plain cross-entropy), accuracy, macro-F1, ECE, per-class P/R/F1 and the confusion matrix.

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
        "ece": calibration.ece(logits.softmax(1), labels),
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
    """A checkpoint's model in eval mode, with the experiment and classes it was trained with, the
    test-time augmentation to answer with, and the checkpoint's calibration if one was fitted for it."""

    exp: config.Experiment
    model: nn.Module
    classes: list[str]
    inputs: runtime.Inputs
    tta: config.Tta = "none"
    calibration: calibration.Calibration | None = None


def load_for_inference(exp_path: str, ckpt_path: str, tta: config.Tta | None = None) -> Trained:
    """Experiment + checkpoint -> model in eval mode.

    The checkpoint is the source of truth for what decides predictions (config.PREDICTION_KEYS):
    an experiment that differs from it in any of them is refused, naming the keys. The experiment
    still says where the data is, which device to use and, unless `tta` overrides it, evaluate.tta.
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
    device = runtime.resolve_device(exp.device, "fp32")
    if trained.train.precision == "fp16" and device.type != "cuda":
        # fp16 autocast is CUDA's; weights trained under it are float32 and answer in fp32 anywhere.
        print(f"note: {ckpt_path} was trained with precision = \"fp16\" (CUDA only); evaluating in fp32 on the {device.type}",
              file=sys.stderr)
        trained, exp = (e.model_copy(update={"train": e.train.model_copy(update={"precision": "fp32"})}) for e in (trained, exp))
    model = models.build(models.untrained(trained.model), len(saved.classes), device, trained.train.channels_last)
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit model {trained.model.arch!r}: {e}") from None
    model.eval()
    tta = tta or exp.evaluate.tta
    return Trained(exp, model, saved.classes, data.inputs(trained, device), tta, calibration.for_checkpoint(ckpt_path, tta))


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
    images, loader = eval_loader(exp, split, root, trained.classes)
    logits, labels = logits_of(trained.model, loader, trained.inputs, trained.tta)
    return images.paths, logits, labels


def eval_loader(exp: config.Experiment, split: str, root: str, classes: list[str]) -> tuple[data.Split, DataLoader]:
    """A split scanned and decoded as training does it (unreadable files reported and left out), and
    the loader that evaluates it."""
    images = data.scan_split(split, root, classes)
    decoded, failures = data.decode_split(images, exp.data, progress=False)
    for f in failures:
        print(f"skipped: {f}", file=sys.stderr)
    return images, data.split_loader(exp, images, decoded)


def evaluate_checkpoint(
    exp_path: str, ckpt_path: str, split: str, predictions: Path | None = None, tta: config.Tta | None = None
) -> dict[str, Any]:
    """A checkpoint's metrics on a split, the TTA used, and where the checkpoint has a calibration,
    the temperature with the split's loss and ECE after it; with `predictions`, also the per-image CSV
    a run writes (uncalibrated, as the run's)."""
    trained = load_for_inference(exp_path, ckpt_path, tta)
    paths, logits, labels = split_logits(trained, split)
    if predictions is not None:
        root = trained.exp.data.val_dir if split == "val" else trained.exp.data.test_dir
        relative = [os.path.relpath(p, root) for p in paths]
        report.write_predictions(predictions, relative, logits, labels, trained.classes)
    metrics = compute_metrics(logits, labels, trained.classes) | {"tta": trained.tta}
    if (cal := trained.calibration) is not None:
        metrics["calibrated"] = {
            "temperature": cal.temperature,
            "loss": calibration.nll(logits, labels, cal.temperature),
            "ece": calibration.ece(cal.probabilities(logits), labels),
        }
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment TOML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="a .safetensors checkpoint from a run directory")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which split to evaluate")
    parser.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    parser.add_argument(
        "--tta", choices=["none", "flip"], help="test-time augmentation (default: the experiment's evaluate.tta)"
    )
    parser.add_argument(
        "--predictions", type=Path, metavar="CSV", help="also write per-image predictions, as a run's predictions_<split>.csv"
    )
    args = parser.parse_args(argv)

    def go() -> int:
        metrics = evaluate_checkpoint(args.experiment, args.checkpoint, args.split, args.predictions, args.tta)
        if args.json:
            print(json.dumps(metrics, indent=2))
            return 0
        print(
            f"{args.split}: {metrics['images']} images  accuracy {metrics['accuracy']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  ECE {metrics['ece']:.4f}  tta {metrics['tta']}"
        )
        if "calibrated" in metrics:
            after = metrics["calibrated"]
            print(
                f"calibrated: T={after['temperature']:.4f}  ECE {metrics['ece']:.4f} -> {after['ece']:.4f}  "
                f"loss {metrics['loss']:.4f} -> {after['loss']:.4f}"
            )
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
