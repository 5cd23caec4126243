"""The interpreter: one validated experiment in, one run directory out.

`python -m imgcls.run EXPERIMENT.toml [--dry-run] [--resume]`

A run is a pure function of (experiment, data, seed): everything it depends on is read from the
experiment, and everything it produces lands in <output.root>/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import imgcls
from imgcls import checkpoint as ckpt_io
from imgcls import config, data, evaluate, models, report, train
from imgcls.errors import CheckpointError, ConfigError, UserError

BEST, LAST = "best.safetensors", "last.safetensors"


def run(exp: config.Experiment, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, select, evaluate and report one experiment; returns what metrics.json holds."""
    device = resolve_device(exp.device)
    exp = exp.model_copy(update={"device": device.type})  # the run records the resolved device
    problems = config.path_problems(exp)
    if problems:
        raise ConfigError("experiment", problems)
    run_dir = prepare_run_dir(exp, resume)
    if resume and (run_dir / "metrics.json").exists():  # killed after its last write: nothing left to do
        print(f"{run_dir} already holds the finished run", file=sys.stderr)
        return json.loads((run_dir / "metrics.json").read_text())
    seed_everything(exp.seed, device)
    train.configure_allocator(exp.train.allocator)  # before the first image is decoded: it governs every later block

    # The model first: pretrained weights that cannot be had fail the run before any image is
    # decoded or file written. Decoding draws no randomness, so the order leaves the bits alone.
    model = build(exp, len(data.scan_classes(exp.data.train_dir)), device)
    dataset = data.prepare(exp.data, progress)  # the preflight: every image decoded and checked once
    loaders = build_loaders(exp, dataset)
    # Which path augments each split changes the bits (its draws differ), so the run records it.
    dataset.report["transforms"] = {
        name: "batched" if isinstance(loader.dataset.transform, data.BatchAugment) else "per_image"
        for name, loader in loaders.items()
    }
    print_preflight(dataset.report)
    report.write_json(run_dir / "preflight.json", dataset.report)
    ckpt_io.atomic_write(run_dir / "config.toml", config.to_toml(exp))
    report.write_json(run_dir / "env.json", environment())

    optimizer = train.build_optimizer(exp.optimizer, model.parameters())
    schedule = train.build_scheduler(exp.scheduler, optimizer, exp.train.epochs, len(loaders["train"]))
    monitor = train.build_monitor(exp)
    state = train.LoopState()
    if resume and (run_dir / LAST).exists():
        state = restore(run_dir / LAST, exp, model, optimizer, schedule, monitor, device)
    elif resume:
        print(f"{run_dir} holds no finished epoch yet: starting at epoch 1", file=sys.stderr)
    feed = build_feed(exp, model, loaders, device)  # after restore: a cache is built from the weights that train on

    fit(exp, model, feed, optimizer, schedule, monitor, state, dataset.classes, run_dir, device, progress)
    return finish(exp, model, feed, dataset.classes, state, monitor, run_dir, device)


def fit(exp, model, feed, optimizer, schedule, monitor, state, classes, run_dir, device, progress) -> None:
    """Epochs state.epoch+1 .. epochs; after each, the last (and maybe best) checkpoint is saved."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=exp.train.label_smoothing)
    while state.epoch < exp.train.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        fit_metrics = train.train_one_epoch(
            feed.net, feed.loaders["train"], feed.prepare_input, loss_fn, optimizer, schedule, device, exp.train.precision,
            epoch, progress,
        )
        logits, labels = evaluate.predict_logits(feed.net, feed.loaders["val"], feed.prepare_input, device, exp.train.precision)
        val = evaluate.compute_metrics(logits, labels, classes)
        train.step_epoch_scheduler(schedule, {"val_loss": val["loss"], "val_acc": val["accuracy"]})
        seconds = time.perf_counter() - start
        row = train.epoch_row(epoch, fit_metrics, val, lr, seconds)
        is_best, stop = monitor.update(epoch, row[exp.train.select_best])
        state.epoch, state.stopped_early = epoch, stop and epoch < exp.train.epochs
        state.history.append(row)
        state.train_seconds += seconds
        state.monitor = vars(monitor).copy()
        if is_best:
            save(run_dir / BEST, exp, model, classes, state)
        save(run_dir / LAST, exp, model, classes, state, optimizer, schedule)
        report.write_history(run_dir / "history.csv", state.history)
        tqdm.write(report.summary_line(epoch, exp.train.epochs, row, is_best), file=sys.stderr)
        if state.stopped_early:
            tqdm.write(f"early stopping: no improvement in {monitor.patience} epochs", file=sys.stderr)


def finish(exp, model, feed, classes, state, monitor, run_dir, device) -> dict[str, Any]:
    """Reload the best weights, evaluate val (and test), and write every result file."""
    if not (run_dir / BEST).exists():
        raise UserError(f"no epoch gave a finite {exp.train.select_best}; nothing to evaluate")
    best = ckpt_io.load(run_dir / BEST)
    model.load_state_dict(best.model)  # feed.net shares these parameters
    results: dict[str, Any] = {"classes": classes}
    reports = []
    for split in ("val", "test"):
        if split not in feed.loaders:
            continue
        logits, labels = evaluate.predict_logits(feed.net, feed.loaders[split], feed.prepare_input, device, exp.train.precision)
        results[split] = evaluate.compute_metrics(logits, labels, classes)
        reports.append(f"== {split} ==\n{evaluate.text_report(logits, labels, classes)}")
        report.plot_confusion(
            run_dir / f"confusion_matrix_{split}.png", results[split]["confusion_matrix"], classes, f"{exp.name}: {split}"
        )
    results |= {
        "best_epoch": monitor.best_epoch,
        "select_best": exp.train.select_best,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 3),
        "feature_cache": feed.feature_cache,
    }
    ckpt_io.atomic_write(run_dir / "classification_report.txt", "\n".join(reports))
    report.write_history(run_dir / "history.csv", state.history)  # again: a kill may have cut off the epoch's write
    report.plot_curves(run_dir / "curves.png", state.history, monitor.best_epoch)
    report.write_json(run_dir / "metrics.json", results)  # written last: its presence marks a finished run
    return results


# ----------------------------------------------------------------------------------- builders


def resolve_device(name: str) -> torch.device:
    match name:
        case "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case "cuda" if not torch.cuda.is_available():
            raise ConfigError("device", ['"cuda" was asked for but no CUDA device is available; use "auto" or "cpu"'])
        case _:
            return torch.device(name)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # CPU: every op has a deterministic kernel. CUDA: a few backward kernels (adaptive pooling) have
    # none, so there it warns instead of failing; bit-identical runs are promised on the CPU only.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = False


def build(exp: config.Experiment, num_classes: int, device: torch.device, pretrained: bool = True) -> nn.Module:
    """The model on its device and memory format. pretrained=False skips weight loading (a checkpoint follows)."""
    cfg = exp.model
    if not pretrained and isinstance(cfg, config.ResNet18):
        cfg = cfg.model_copy(update={"weights": "none"})
    model = models.build_model(cfg, num_classes)
    memory_format = torch.channels_last if exp.train.channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)


def input_preparer(exp: config.Experiment, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = data.normalization(exp.data)
    return data.Normalize(mean, std, exp.train.channels_last).to(device)


def build_loaders(exp: config.Experiment, dataset: data.Data) -> dict[str, Any]:
    loaders = {}
    for split_name, split in dataset.splits.items():
        is_train = split_name == "train"
        ops = exp.augment if is_train else []  # evaluation: the centre crop alone
        transform = data.split_transform(ops, exp.data.image_size, dataset.images[split_name])
        images = data.ImageSet(split, dataset.images[split_name], transform, exp.seed)
        batch = exp.data.batch_size if is_train else exp.data.eval_batch_size
        loaders[split_name] = data.make_loader(images, batch, is_train, exp.data.num_workers, exp.seed)
    return loaders


def build_feed(exp: config.Experiment, model: models.Classifier, loaders: dict[str, Any], device: torch.device) -> train.Feed:
    """Images through the whole model; or, where train.feature_cache applies exactly, the frozen
    backbone's features computed once per split and fed to the head (same batches, same order)."""
    prepare_input = input_preparer(exp, device)
    if not train.feature_cache_applies(exp):
        return train.Feed(model, prepare_input, loaders, feature_cache=False)
    cached = {}
    for split_name, loader in loaders.items():
        in_order = data.make_loader(loader.dataset, exp.data.eval_batch_size, False, 0, exp.seed)
        features = train.cache_features(model.backbone, in_order, prepare_input, device, exp.train.precision)
        batch = exp.data.batch_size if split_name == "train" else exp.data.eval_batch_size
        features_set = data.FeatureSet(features, loader.dataset.split.labels)
        cached[split_name] = data.make_loader(features_set, batch, split_name == "train", 0, exp.seed)
    return train.Feed(model.head, lambda features: features.to(device, non_blocking=True), cached, feature_cache=True)


# ------------------------------------------------------------------------- run directory, resume


# Keys that cannot change a run's numbers, so a resume may change them: workers only move work
# around (augmentation is keyed by sample), and the root only says where the run directory lives.
RESULT_NEUTRAL = {"data.num_workers", "output.root"}


def prepare_run_dir(exp: config.Experiment, resume: bool) -> Path:
    """Check that the run directory may be (re)used; creates nothing (the first result file does).

    Leftover temp files of a killed save are deleted here, so they are never mistaken for results.
    """
    run_dir = Path(exp.output.root) / exp.name
    ckpt_io.clean_temp_files(run_dir)
    finished = (run_dir / "metrics.json").exists()
    started = (run_dir / LAST).exists() or (run_dir / "config.toml").exists()
    if finished and not resume:
        raise UserError(
            f"{run_dir} already holds a finished run (metrics.json). To keep it, change `name` in the experiment; "
            f"to replace it, delete the folder first (rm -r {run_dir})"
        )
    if started and not resume:
        raise UserError(
            f"{run_dir} holds an unfinished run. Continue it with --resume, or delete the folder (rm -r {run_dir})"
        )
    if resume and (run_dir / "config.toml").exists():
        previous = config.load(run_dir / "config.toml").model_dump(mode="json")
        changed = differing_keys(previous, exp.model_dump(mode="json"))
        refused = [k for k in changed if k not in RESULT_NEUTRAL]
        if refused:
            raise UserError(
                f"cannot resume {run_dir}: the experiment changed since the run started:\n"
                + describe_changes(previous, exp.model_dump(mode="json"), refused, "run", "now")
                + "\nRestore those values, or start a new run under another `name`"
            )
        if changed:
            print(f"resuming with changed {', '.join(changed)} (does not change results)", file=sys.stderr)
    return run_dir


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [k for key in keys for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def describe_changes(a: dict, b: dict, keys: list[str], a_name: str, b_name: str) -> str:
    """One line per differing key path: `  - model.channels: [8, 16] (run) vs [8, 32] (now)`."""

    def value(tree: Any, key: str) -> str:
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        text = "absent" if tree is None else json.dumps(tree)
        return text if len(text) <= 80 else text[:77] + "..."

    return "\n".join(f"  - {k}: {value(a, k)} ({a_name}) vs {value(b, k)} ({b_name})" for k in keys)


def save(path, exp, model, classes, state, optimizer=None, schedule=None) -> None:
    """A weights-only checkpoint, or with optimizer and schedule the full state that --resume restores."""
    meta = {
        "classes": classes,
        "arch": exp.model.arch,
        "experiment": config.to_toml(exp),
        "epoch": state.epoch,
        "imgcls_version": imgcls.__version__,
    }
    optim_tensors, rng = {}, {}
    if optimizer is not None:
        optim_tensors, skeleton = ckpt_io.flatten_state(
            {"optimizer": optimizer.state_dict(), "scheduler": schedule.scheduler.state_dict()}, "s"
        )
        rng, meta["rng"] = rng_state()
        meta |= {"resume": skeleton, "loop": state.to_json()}
    ckpt_io.save(path, ckpt_io.Checkpoint(model.state_dict(), meta, optim_tensors, rng))


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator a run may draw from: torch (dropout), CUDA, Python's random and NumPy's legacy one."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"])
    version, gauss = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def restore(path, exp, model, optimizer, schedule, monitor, device) -> train.LoopState:
    """Put model, optimizer, scheduler, monitor and every RNG back as they were after the saved epoch."""
    saved = ckpt_io.load(path)
    if not {"resume", "loop", "rng"} <= saved.meta.keys():
        raise CheckpointError(f"{path}: holds weights only, not the state needed to resume")
    trained = config.loads(saved.meta["experiment"], f"{path} (stored experiment)").model_dump(mode="json")
    changed = [k for k in differing_keys(trained, exp.model_dump(mode="json")) if k not in RESULT_NEUTRAL]
    if changed:
        raise CheckpointError(
            f"{path} was saved by a different experiment:\n"
            + describe_changes(trained, exp.model_dump(mode="json"), changed, "checkpoint", "now")
        )
    model.load_state_dict(saved.model)
    states = ckpt_io.unflatten_state(saved.meta["resume"], saved.optim)
    optimizer.load_state_dict(states["optimizer"])
    schedule.scheduler.load_state_dict(states["scheduler"])
    state = train.LoopState(**saved.meta["loop"])
    for key, value in state.monitor.items():
        setattr(monitor, key, value)
    set_rng_state(saved.rng, saved.meta["rng"], device)
    print(f"resuming {path.parent} after epoch {state.epoch}", file=sys.stderr)
    return state


# ----------------------------------------------------------------------- inference from a checkpoint


@dataclass
class Loaded:
    exp: config.Experiment
    model: nn.Module
    classes: list[str]
    device: torch.device
    prepare_input: Callable[[torch.Tensor], torch.Tensor]


def load_for_inference(exp_path: str, ckpt_path: str) -> Loaded:
    """Experiment + checkpoint -> model in eval mode, refusing a checkpoint that does not match."""
    exp = config.load(exp_path)
    saved = ckpt_io.load(ckpt_path)
    trained = config.loads(saved.meta["experiment"], f"{ckpt_path} (stored experiment)")
    if trained.model != exp.model:
        before, now = {"model": trained.model.model_dump(mode="json")}, {"model": exp.model.model_dump(mode="json")}
        raise CheckpointError(
            f"{ckpt_path} was trained with a different model than {exp_path}:\n"
            + describe_changes(before, now, differing_keys(before, now), "checkpoint", "experiment")
            + "\nuse the experiment the checkpoint came from"
        )
    if Path(exp.data.train_dir).is_dir():
        classes_now = data.scan_classes(exp.data.train_dir)
        if classes_now != saved.classes:
            raise CheckpointError(
                f"{ckpt_path} knows classes {saved.classes}, but {exp.data.train_dir} has {classes_now}: "
                f"missing from the checkpoint {sorted(set(classes_now) - set(saved.classes))}, "
                f"extra in it {sorted(set(saved.classes) - set(classes_now))}"
            )
    device = resolve_device(exp.device)
    model = build(exp, len(saved.classes), device, pretrained=False)
    try:
        model.load_state_dict(saved.model)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit model {exp.model.arch!r}: {e}") from None
    model.eval()
    return Loaded(exp, model, saved.classes, device, input_preparer(exp, device))


def split_logits(loaded: Loaded, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Paths, logits and labels of a split, through the same decode and eval transform as training."""
    exp = loaded.exp
    root = exp.data.val_dir if split == "val" else exp.data.test_dir
    if root is None:
        raise ConfigError("experiment", ["data.test_dir is not set, so there is no test split to evaluate"])
    images = data.scan_split(split, root, loaded.classes)
    decoded, failures = data.decode_split(images, exp.data.resize_size, progress=False)
    for f in failures:
        print(f"skipped: {f}", file=sys.stderr)
    dataset = data.ImageSet(images, decoded, data.split_transform([], exp.data.image_size, decoded), exp.seed)
    loader = data.make_loader(dataset, exp.data.eval_batch_size, False, 0, exp.seed)
    logits, labels = evaluate.predict_logits(loaded.model, loader, loaded.prepare_input, loaded.device, exp.train.precision)
    return images.paths, logits, labels


def evaluate_checkpoint(exp_path: str, ckpt_path: str, split: str) -> dict[str, Any]:
    loaded = load_for_inference(exp_path, ckpt_path)
    _, logits, labels = split_logits(loaded, split)
    return evaluate.compute_metrics(logits, labels, loaded.classes)


# ------------------------------------------------------------------------------------ reporting


def print_preflight(rep: dict[str, Any]) -> None:
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


def environment() -> dict[str, Any]:
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "imgcls": imgcls.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Terminated()


def guarded(fn: Callable[[], int], on_interrupt: str = "") -> int:
    """Run a command: user errors print one clear message (no traceback) and exit 2.

    Ctrl-C exits 130 and SIGTERM 143 (the shell's 128 + signal), after saying what was kept.
    """
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.run", description="Train and evaluate one experiment.")
    parser.add_argument("experiment", help="path to the experiment TOML file")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved experiment; read no images")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run of this experiment")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def go() -> int:
        exp = config.load(args.experiment)
        if args.dry_run:
            print(config.to_toml(exp.model_copy(update={"device": resolve_device(exp.device).type})), end="")
            return 0
        results = run(exp, resume=args.resume, progress=not args.quiet and sys.stderr.isatty())
        run_dir = Path(exp.output.root) / exp.name
        for split in ("val", "test"):
            if split in results:
                m = results[split]
                print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}")
        print(f"best epoch {results['best_epoch']} of {results['epochs_run']}; results in {run_dir}")
        return 0

    return guarded(go, on_interrupt="every finished epoch is saved: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
