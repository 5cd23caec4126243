"""model.zero_init_residual: ResNet18 from scratch (weights "none") with and without, over seeds.

`python -m bench.zero_init [--seeds 3] [--epochs 4] [--size 112] [--quick]`, or `python -m bench zero_init`.
Each (seed, zero_init_residual) pair is one whole imgcls run on the groceries photos (675 train,
57 val, 661 test images, 5 classes), in this process, one after the other; the two settings of a
seed alternate so both see the same drift in the machine's load. Prints the val and test accuracy
of every run, then per setting the mean and the spread (sample standard deviation, min..max).
The schema's default should follow these figures; README.md ("Backbones") keeps the last ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from bench.common import CACHE, groceries


def experiment(root: str, seed: int, zero_init: bool, epochs: int, size: int) -> dict[str, Any]:
    return {
        "name": f"zero_init_{zero_init}_seed{seed}", "seed": seed, "device": "cpu",
        "data": {"train_dir": f"{root}/train", "val_dir": f"{root}/val", "test_dir": f"{root}/test",
                 "image_size": size, "resize_size": size * 8 // 7, "batch_size": 32},
        "augment": [{"op": "random_resized_crop", "scale": [0.35, 1.0]}, {"op": "horizontal_flip"}],
        "model": {"arch": "resnet18", "weights": "none", "zero_init_residual": zero_init},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
        "scheduler": {"name": "cosine", "warmup_epochs": 1 if epochs > 1 else 0},
        "train": {"epochs": epochs, "select_best": "val_acc"},
        "output": {"root": str(CACHE / "zero_init")},
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else float("nan"),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def measure(seeds: int, epochs: int, size: int) -> dict[str, Any]:
    import shutil

    from imgcls import config, run

    root = str(groceries())
    shutil.rmtree(CACHE / "zero_init", ignore_errors=True)  # every run starts fresh, never resumes
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        for zero_init in (False, True):
            exp = config.validate(experiment(root, seed, zero_init, epochs, size))
            start = time.perf_counter()
            results = run.run(exp, progress=False)
            row = {"seed": seed, "zero_init_residual": zero_init, "val_acc": results["val"]["accuracy"],
                   "test_acc": results["test"]["accuracy"], "best_epoch": results["best_epoch"],
                   "seconds": round(time.perf_counter() - start, 1)}
            runs.append(row)
            print(f"[zero_init] {json.dumps(row)}", file=sys.stderr, flush=True)
    summary = {
        str(zero_init): {split: spread([r[split] for r in runs if r["zero_init_residual"] == zero_init])
                         for split in ("val_acc", "test_acc")}
        for zero_init in (False, True)
    }
    return {"seeds": seeds, "epochs": epochs, "image_size": size, "runs": runs, "zero_init_residual": summary}


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    """`python -m bench zero_init`: the full measurement, or with --quick a smoke test (not a measurement)."""
    return measure(2, 1, 32) if quick else measure(max(rounds, 3), 4, 112)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zero_init", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="data.image_size in pixels")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, 32 px: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    result = compare(True, 2) if args.quick else measure(args.seeds, args.epochs, args.size)
    for zero_init, splits in result["zero_init_residual"].items():
        for split, s in splits.items():
            print(f"zero_init_residual={zero_init:5} {split}: mean {s['mean']:.4f}  stdev {s['stdev']:.4f}  "
                  f"range {s['min']:.4f}..{s['max']:.4f}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
