"""Class imbalance on the groceries photos: the shipped scratch experiment as it is, with
train.class_weights = "balanced", and with data.sampler = "balanced", over seeds.

`python -m bench.imbalance [--seeds 3] [--epochs N] [--quick]`. Each (seed, setting) is one whole
imgcls run of experiments/scratch_cnn.toml (epochs from the file unless --epochs), one after the
other, the three settings of a seed in a row so they see the same drift in the machine's load.
Prints val and test macro-F1 of every run, then per setting the mean and the spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from typing import Any

from bench.common import CACHE, ROOT, groceries
from bench.zero_init import spread

SETTINGS = {
    "default": {},
    "class_weights_balanced": {"train": {"class_weights": "balanced"}},
    "sampler_balanced": {"data": {"sampler": "balanced"}},
}


def experiment(root: str, seed: int, setting: str, epochs: int | None) -> dict[str, Any]:
    exp = tomllib.loads((ROOT / "experiments" / "scratch_cnn.toml").read_text())
    exp |= {"name": f"{setting}_seed{seed}", "seed": seed, "device": "cpu", "output": {"root": str(CACHE / "imbalance")}}
    exp["data"] |= {"train_dir": f"{root}/train", "val_dir": f"{root}/val", "test_dir": f"{root}/test"}
    for section, values in SETTINGS[setting].items():
        exp[section] = exp.get(section, {}) | values
    if epochs is not None:
        exp["train"]["epochs"] = epochs
    return exp


def measure(seeds: int, epochs: int | None) -> dict[str, Any]:
    from imgcls import config, run

    root = str(groceries())
    shutil.rmtree(CACHE / "imbalance", ignore_errors=True)  # every run starts fresh
    rows = []
    for seed in range(seeds):
        for setting in SETTINGS:
            results = run.run(config.validate(experiment(root, seed, setting, epochs)), progress=False)
            row = {"seed": seed, "setting": setting, "val_macro_f1": results["val"]["macro_f1"],
                   "test_macro_f1": results["test"]["macro_f1"]}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    summary = {
        s: {k: spread([r[k] for r in rows if r["setting"] == s]) for k in ("val_macro_f1", "test_macro_f1")}
        for s in SETTINGS
    }
    return {"runs": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.imbalance", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the experiment file's")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch: a smoke test, not a measurement")
    args = parser.parse_args()
    seeds, epochs = (2, 1) if args.quick else (args.seeds, args.epochs)
    print(json.dumps(measure(seeds, epochs), indent=2))


if __name__ == "__main__":
    main()
