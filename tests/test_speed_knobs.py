"""Speed knobs must not change results: worker count and the frozen-feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import checkpoint, config, run


def _images(root, per_class: int = 6, classes: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] //= 4  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _run(tmp_path, name: str, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    exp = {
        "name": name,
        "device": "cpu",
        "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "image_size": 32,
                 "batch_size": 4, "eval_batch_size": 8},
        "augment": [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "horizontal_flip"}],
        "model": {"arch": "scratch_cnn", "channels": [4, 8], "hidden": 8, "batch_norm": True},
        "train": {"epochs": 2},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            exp[section] = {**exp.get(section, {}), field: value}
        else:
            exp[section] = value
    results = run.run(config.validate(exp), progress=False)
    return results, checkpoint.load(tmp_path / "runs" / name / run.LAST).model


def test_num_workers_do_not_change_bits(tmp_path):
    """Each sample's augmentation is drawn from (seed, epoch, index): who loads it cannot matter."""
    _images(tmp_path)
    serial, serial_weights = _run(tmp_path, "w0", data__num_workers=0)
    parallel, parallel_weights = _run(tmp_path, "w2", data__num_workers=2)
    assert serial_weights.keys() == parallel_weights.keys()
    for key in serial_weights:
        assert torch.equal(serial_weights[key], parallel_weights[key]), key
    assert serial["val"]["loss"] == parallel["val"]["loss"]


@pytest.mark.slow
def test_feature_cache_trains_the_same_head(tmp_path):
    """A frozen backbone without augmentation: caching its features gives the uncached run's head."""
    _images(tmp_path)
    frozen = {"arch": "resnet18", "weights": "none", "freeze_backbone": True}
    common = {"augment": [], "model": frozen, "train__epochs": 3}
    cached, cached_weights = _run(tmp_path, "cached", **common, train__feature_cache=True)
    plain, plain_weights = _run(tmp_path, "plain", **common, train__feature_cache=False)
    assert cached["feature_cache"] is True and plain["feature_cache"] is False
    for key in plain_weights:
        if key.startswith("backbone."):
            assert torch.equal(cached_weights[key], plain_weights[key]), key
    # Same batches in the same order; only the backbone's batch grouping differs (fp rounding).
    torch.manual_seed(0)  # run() seeds the same way before building the model: this is the initial head
    initial = run.models.build_model(config.ResNet18(**frozen), 3).head.weight
    assert not torch.allclose(plain_weights["head.weight"], initial), "the head did not train"
    torch.testing.assert_close(cached_weights["head.weight"], plain_weights["head.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached_weights["head.bias"], plain_weights["head.bias"], rtol=1e-4, atol=1e-5)
    assert cached["val"]["loss"] == pytest.approx(plain["val"]["loss"], rel=1e-4)


def test_feature_cache_needs_a_deterministic_pipeline(tmp_path):
    """With augmentation the cache would be inexact, so the backbone runs every epoch instead."""
    _images(tmp_path, per_class=2)
    frozen = {"arch": "resnet18", "weights": "none", "freeze_backbone": True}
    results, _ = _run(tmp_path, "augmented", model=frozen, train__epochs=1, train__feature_cache=True)
    assert results["feature_cache"] is False
