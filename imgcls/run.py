"""The interpreter: one validated experiment in, one run directory out.

`python -m imgcls.run EXPERIMENT.toml [--dry-run] [--resume] [--smoke]`, or under
`torchrun --nproc_per_node N -m imgcls.run EXPERIMENT.toml` the same run over N processes
(DistributedDataParallel; rank 0 writes every file and prints).

A run is a pure function of (experiment, data, seed): everything it depends on is read from the
experiment, and everything it produces lands in <output.root>/<name>/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from imgcls import (
    checkpoint, config, data, distributed, evaluate, models, page, predict, report, rundir, runtime, train,
)
from imgcls.errors import ConfigError, UserError, guarded
from imgcls.rundir import BEST, LAST, RunDir, Timings


def run(exp: config.Experiment, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train, select, evaluate and report one experiment; returns what metrics.json holds.

    stop_after: end after that many epochs, before evaluating (verify's quick check of a long run);
    returns {} then, and the folder holds a resumable run.
    """
    device = runtime.resolve_device(exp.device, exp.train.precision)
    exp = exp.model_copy(update={"device": device.type})  # the run records the resolved device
    problems = config.path_problems(exp.model_dump(mode="json"))
    if problems:
        raise ConfigError("experiment", problems)
    world = distributed.setup(device)
    try:
        distributed.check_batch(exp.data.batch_size, world)
        with distributed.peers_watched(world), _claim(exp, resume, world) as run_path:
            if resume and (run_path / "metrics.json").exists():  # killed after its last write: nothing left to do
                if world.is_main:
                    print(f"{run_path} already holds the finished run", file=sys.stderr)
                return json.loads((run_path / "metrics.json").read_text())
            run_dir, feed, opt, state = setup(exp, run_path, resume, progress, world)
            fit(run_dir, feed, opt, state, progress, stop_after or exp.train.epochs)
            if state.epoch < exp.train.epochs and not state.stopped_early:
                return {}
            return finish(run_dir, feed, state)
    finally:
        distributed.teardown(world)


@contextlib.contextmanager
def _claim(exp: config.Experiment, resume: bool, world: distributed.World) -> Iterator[Path]:
    """Rank 0 claims the run directory (lock and reuse rules) and tells the others how it went: a
    refused claim stops every rank with rank 0's reason (on another machine, the others would only
    have seen rank 0 vanish, after the collectives' timeout)."""
    if not world.is_main:
        refusal = world.from_main(None)
        if refusal is not None:
            raise UserError(refusal)
        yield Path(exp.output.root) / exp.name
        return
    with contextlib.ExitStack() as stack:
        try:
            run_path = stack.enter_context(rundir.claim(exp, resume))
        except Exception as e:
            world.from_main(str(e) if isinstance(e, UserError) else f"rank 0 could not claim the run folder: {e!r}")
            raise
        world.from_main(None)
        yield run_path


def setup(
    exp: config.Experiment, run_path: Path, resume: bool, progress: bool, world: distributed.World = distributed.World()
) -> tuple[RunDir, train.Feed, train.Optimization, train.LoopState]:
    """The preflight, the run's inputs recorded, then model, optimizer and loop state (restored on resume)."""
    device = distributed.device_of(runtime.resolve_device(exp.device, exp.train.precision), world)
    # Ranks draw their own dropout masks; DDP copies rank 0's weights.
    runtime.seed_everything(exp.seed + world.rank, device)
    runtime.configure_allocator(exp.train.allocator)  # before the first image is decoded: it governs every later block
    progress = progress and world.is_main

    # The model first: pretrained weights that cannot be had fail the run before any image is
    # decoded or file written. Decoding draws no randomness, so the order leaves the bits alone.
    model = models.build(exp.model, len(data.scan_classes(exp.data.train_dir)), device, exp.train.channels_last)
    if world.distributed and exp.train.sync_batchnorm in ("auto", True):
        distributed.sync_batchnorm(model, device)
    with world.local_first():  # one decoded cache per machine, built by its local rank 0
        dataset = data.prepare(exp.data, progress)  # the preflight: every image decoded and checked once
    loaders = data.build_loaders(exp, dataset, world)
    if world.is_main:  # what the run depends on is recorded once (git, file hashes): by rank 0, which writes it
        dataset.report["transforms"] = data.transform_paths(loaders)
        inputs = rundir.manifest(exp, dataset, world)
        report.print_preflight(dataset.report)
        if resume:
            rundir.refuse_other_inputs(run_path, inputs)
        report.write_json(run_path / "preflight.json", dataset.report)
        report.write_json(run_path / rundir.MANIFEST, inputs)
        checkpoint.atomic_write(run_path / "config.toml", config.to_toml(exp))

    run_dir = RunDir(run_path, exp, dataset.classes, world)
    class_counts = data.class_counts(dataset.splits["train"], dataset.classes)
    opt = train.build_optimization(exp, model, len(loaders["train"]), class_counts)
    state = train.LoopState(train.build_monitor(exp))
    if resume and (run_path / LAST).exists():
        state = run_dir.restore(model, opt, device)
    elif resume and world.is_main:
        print(f"{run_path} holds no finished epoch yet: starting at epoch 1", file=sys.stderr)
    feed = train.build_feed(exp, model, loaders, device, world)  # after restore: a cache is built from the weights that train on
    return run_dir, feed, opt, state


def fit(run_dir: RunDir, feed: train.Feed, opt: train.Optimization, state: train.LoopState, progress: bool, until: int) -> None:
    """Epochs state.epoch+1 .. until; after each, the last (and maybe best) checkpoint is saved."""
    exp, monitor = run_dir.exp, state.monitor
    timings = Timings.start(run_dir.path)
    while state.epoch < min(until, exp.train.epochs) and not state.stopped_early:
        epoch = state.epoch + 1
        start = time.perf_counter()
        lr = opt.optimizer.param_groups[0]["lr"]
        fit_metrics = train.train_one_epoch(feed, opt, epoch, progress and feed.world.is_main)
        # Every rank gets the same logits, so all of them agree on the best epoch and on stopping.
        logits, labels = evaluate.split_logits_of(feed.judged(opt), feed.loaders["val"], feed.inputs, feed.world)
        val = evaluate.compute_metrics(logits, labels, run_dir.classes)
        train.step_epoch_scheduler(opt.schedule, {"val_loss": val["loss"], "val_acc": val["accuracy"]})
        row = train.epoch_row(epoch, fit_metrics, val, lr) | {"weights": checkpoint.weights_digest(feed.model.state_dict())}
        is_best, stop = monitor.update(epoch, row[exp.train.select_best])
        state.epoch, state.stopped_early = epoch, stop and epoch < exp.train.epochs
        state.history.append(row)
        if is_best:
            run_dir.save(BEST, feed.model, state, average=opt.ema)
        run_dir.save(LAST, feed.model, state, opt, average=opt.ema)
        if not feed.world.is_main:
            continue
        report.write_history(run_dir.path / "history.csv", state.history)
        seconds = time.perf_counter() - start
        timings.record(run_dir.path, epoch, seconds)
        tqdm.write(report.summary_line(epoch, exp.train.epochs, row, seconds, is_best), file=sys.stderr)
        if state.stopped_early:
            tqdm.write(f"early stopping: no improvement in {monitor.patience} epochs", file=sys.stderr)


def finish(run_dir: RunDir, feed: train.Feed, state: train.LoopState) -> dict[str, Any]:
    """Reload the best weights, evaluate val (and test), and write every result file."""
    exp, classes, path = run_dir.exp, run_dir.classes, run_dir.path
    run_dir.world.barrier()  # rank 0's last save is on disk before any rank reads the best weights
    if not (path / BEST).exists():
        raise UserError(f"no epoch gave a finite {exp.train.select_best}; nothing to evaluate")
    feed.model.load_state_dict(checkpoint.load(path / BEST).weights)  # feed.net shares these parameters
    results: dict[str, Any] = {"classes": classes}
    reports = []
    net, loaders, inputs = feed.evaluation(exp.evaluate.tta)
    for split in ("val", "test"):
        if split not in loaders:
            continue
        logits, labels = evaluate.split_logits_of(net, loaders[split], inputs, feed.world, exp.evaluate.tta)
        results[split] = evaluate.compute_metrics(logits, labels, classes)
        if not run_dir.world.is_main:
            continue
        images = loaders[split].dataset.split
        report.write_predictions(path / f"predictions_{split}.csv", images.relative_paths(), logits, labels, classes)
        reports.append(f"== {split} ==\n{evaluate.text_report(logits, labels, classes)}")
        report.plot_confusion(path / f"confusion_matrix_{split}.png", results[split]["confusion_matrix"], classes, f"{exp.name}: {split}")
        report.plot_reliability(path / f"reliability_{split}.png", logits.softmax(1), labels, f"{exp.name}: {split}")
    results |= {
        "tta": exp.evaluate.tta,
        "best_epoch": state.monitor.best_epoch,
        "select_best": exp.train.select_best,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "feature_cache": feed.feature_cache,
    }
    if not run_dir.world.is_main:
        return results
    checkpoint.atomic_write(path / "classification_report.txt", "\n".join(reports))
    report.write_history(path / "history.csv", state.history)  # again: a kill may have cut off the epoch's write
    report.plot_curves(path / "curves.png", state.history, state.monitor.best_epoch)
    page.write_report(path, results)  # report.html, from the files above and the results
    report.write_json(path / "metrics.json", results)  # written last: its presence marks a finished run
    return results


# ------------------------------------------------------------------------------------ smoke run

SMOKE_IMAGES = 4  # files per class of each split: the first ones, in the order a run scans them


def smoke(exp: config.Experiment, progress: bool) -> None:
    """The whole path on a small copy of the experiment, in a temporary folder that is then removed:
    preflight, one epoch, evaluation, every result file, and a prediction from the best checkpoint."""
    begun = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgcls-smoke-") as folder:
        small = smoke_experiment(exp, Path(folder))
        results = run(small, progress=progress)
        run_path = Path(small.output.root) / small.name
        trained = evaluate.load_for_inference(str(run_path / "config.toml"), str(run_path / BEST))
        image = data.scan_split("val", small.data.val_dir, trained.classes).paths[0]
        [guess], _ = predict.classify(trained, [image], top_k=1)
        top = guess["top"][0]
        written = sorted(p.name for p in run_path.iterdir() if not p.name.startswith("."))
        print(f"smoke: val accuracy {results['val']['accuracy']:.4f} after 1 epoch; wrote {', '.join(written)}")
        print(f"smoke: predict {os.path.relpath(image, folder)}: {report.display_name(top['class'])} {top['probability']:.3f}")
    print(f"smoke: the whole path ran in {time.perf_counter() - begun:.1f} s; its folder {folder} is removed")


def smoke_experiment(exp: config.Experiment, folder: Path) -> config.Experiment:
    """A small copy of exp whose every output lands in folder: one epoch on links to the first
    SMOKE_IMAGES files per class of each split, the decoded cache and output.root in folder. All
    else (model, augmentation, batch sizes, seed) is exp's, and it runs through the normal `run`."""
    tree = exp.model_dump(mode="json")
    for key in ("train_dir", "val_dir", "test_dir"):
        if tree["data"][key] is not None:
            tree["data"][key] = _first_images(tree["data"][key], folder / "data" / key.removesuffix("_dir"))
    tree["data"]["cache_dir"] = str(folder / "cache")  # the user's cache gains no files from a smoke run
    tree["output"]["root"] = str(folder / "runs")
    tree["train"]["epochs"] = 1
    if "warmup_epochs" in tree["scheduler"]:
        tree["scheduler"]["warmup_epochs"] = 0  # must be less than epochs
    return config.validate(tree, f"the smoke copy of {exp.name}")


def _first_images(root: str, into: Path) -> str:
    """into/<class>/... as links to the first SMOKE_IMAGES image files of each class folder of root."""
    for cls in data.scan_classes(root):
        folder = os.path.join(root, cls)
        for path in data.image_files(folder, Counter())[:SMOKE_IMAGES]:
            link = into / cls / os.path.relpath(path, folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.abspath(path))
    return str(into)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.run", description="Train and evaluate one experiment.")
    parser.add_argument("experiment", help="path to the experiment TOML file")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved experiment; read no images")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run of this experiment")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"run the whole path on {SMOKE_IMAGES} images per class for 1 epoch in a temporary folder, then remove it",
    )
    args = parser.parse_args(argv)
    if args.smoke and (args.dry_run or args.resume):
        parser.error("--smoke runs a temporary copy of the experiment: it takes neither --dry-run nor --resume")

    def go() -> int:
        exp = config.load(args.experiment, check_paths=True)
        if args.smoke:
            smoke(exp, progress=not args.quiet and sys.stderr.isatty())
            return 0
        if args.dry_run:
            print(config.to_toml(exp.model_copy(update={"device": runtime.resolve_device(exp.device, exp.train.precision).type})), end="")
            return 0
        results = run(exp, resume=args.resume, progress=not args.quiet and sys.stderr.isatty())
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
            return 0
        for split in ("val", "test"):
            if split in results:
                m = results[split]
                print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}  ECE {m['ece']:.4f}")
        print(f"best epoch {results['best_epoch']} of {results['epochs_run']}; results in {Path(exp.output.root) / exp.name}")
        return 0

    return guarded(go, on_interrupt="every finished epoch is saved: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
