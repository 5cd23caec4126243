"""Helpers shared by the properties: showing a property can fail, generated images, tiny runs."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample
from PIL import Image
from pydantic import TypeAdapter
from torch import nn

from imgcls import checkpoint, config, models


def falsify(check: Callable[[Any], None], strategy, max_examples: int = 300, raises: tuple = ()) -> Any:
    """An example of `strategy` on which `check` fails an assert; fails the calling test if there is none.

    Properties are written as plain check functions taking the implementation under test, so a
    test of the test can hand the same check a deliberately broken implementation and require
    hypothesis to refute it. A check that cannot fail would make this raise. `raises` names the
    errors a broken variant may raise instead (a layer that refuses an input the real one accepts).
    """

    def refuted(value: Any) -> bool:
        try:
            check(value)
        except (AssertionError, *raises):
            return True
        return False

    try:
        return find(
            strategy,
            refuted,
            settings=settings(
                max_examples=max_examples,
                phases=[Phase.generate],  # any refutation will do: shrinking it only costs time
                suppress_health_check=list(HealthCheck),
                database=None,
                # The same examples every run: a refutation that random search finds only sometimes
                # (a rare input) would make the break-check pass or fail by chance.
                derandomize=True,
            ),
        )
    except NoSuchExample:
        raise AssertionError(f"the check accepted the broken variant on {max_examples} examples") from None


# ------------------------------------------------------------------------------------------ models

MODEL = TypeAdapter(config.Model)


def built(cfg: config.Model, num_classes: int, seed: int = 0) -> nn.Module:
    """models.build_model after torch.manual_seed(seed), cached: ResNet18 takes longer to build than to check.

    Shared between examples, so callers must not modify it (deep-copy it first).
    """
    return _built(cfg.model_dump_json(), num_classes, seed)


@functools.cache
def _built(cfg_json: str, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model(MODEL.validate_json(cfg_json), num_classes)


# ------------------------------------------------------------------------------------------ images


def write_image_folders(root: Path, layout: dict[str, dict[str, int]], seed: int) -> None:
    """root/<split>/<class>/<i>.png for {split: {class: count}}; classes differ by their dominant colour."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for k, (cls, count) in enumerate(sorted(classes.items())):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(16, 33, size=2)
                pixels = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8)
                pixels[..., k % 3] += 120
                Image.fromarray(pixels).save(folder / f"{split}_{cls}_{i}.png")


def tiny_experiment(data_root: Path, out_root: Path, name: str, **sections: Any) -> config.Experiment:
    """A few-second CPU experiment on `tiny_data`; keyword sections update the defaults below."""
    exp: dict[str, Any] = {
        "name": name,
        "seed": 7,
        "device": "cpu",
        "data": {
            "train_dir": str(data_root / "train"),
            "val_dir": str(data_root / "val"),
            "test_dir": str(data_root / "test"),
            "image_size": 16,
            "batch_size": 8,
            "normalize": "half",
        },
        "augment": [
            {"op": "random_resized_crop", "scale": [0.5, 1.0]},
            {"op": "horizontal_flip"},
            {"op": "color_jitter", "brightness": 0.3},
            {"op": "random_erasing", "p": 0.5},
        ],
        "model": {"arch": "scratch_cnn", "channels": [4, 8], "hidden": 8, "dropout": 0.3, "batch_norm": True},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2},
        "output": {"root": str(out_root)},
    }
    for key, value in sections.items():
        exp[key] = exp[key] | value if key in ("data", "train") else value  # a model or augment list replaces
    return config.validate(exp)


def run_outputs(run_dir: Path) -> dict[str, Any]:
    """What a run must reproduce bit for bit: weight bytes, metrics, history (none holds a wall-clock time)."""
    weights = {}
    for name in ("best.safetensors", "last.safetensors"):
        saved = checkpoint.load(run_dir / name)
        weights[name] = {k: v.numpy().tobytes() for k, v in saved.model.items()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return {"weights": weights, "metrics": metrics, "history": history}
