"""Speed knobs must not change results: worker count and the frozen-feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


from imgcls import checkpoint, config, data, evaluate, models, run, rundir, train


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
    return results, checkpoint.load(tmp_path / "runs" / name / rundir.LAST).model


PER_IMAGE = [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "horizontal_flip"}]
BATCHED = [{"op": "random_crop", "padding": 4, "padding_mode": "reflect"}, {"op": "horizontal_flip"}]


def _workers_agree(tmp_path, augment: list) -> None:
    serial, serial_weights = _run(tmp_path, "w0", data__num_workers=0, augment=augment)
    parallel, parallel_weights = _run(tmp_path, "w2", data__num_workers=2, augment=augment)
    assert serial_weights.keys() == parallel_weights.keys()
    for key in serial_weights:
        assert torch.equal(serial_weights[key], parallel_weights[key]), key
    assert serial["val"]["loss"] == parallel["val"]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("augment, batched", [(PER_IMAGE, False), (BATCHED, True)], ids=["per_image", "batched"])
def test_num_workers_do_not_change_bits(tmp_path, augment, batched):
    """Each sample's augmentation is drawn from (seed, epoch, index): who loads it cannot matter,
    on the per-image (transforms v2) path and on the batched path alike."""
    _images(tmp_path)
    exp = config.validate({"name": "x", "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"),
                           "image_size": 32}, "augment": augment, "model": {"arch": "scratch_cnn"}})
    transform = data.build_loaders(exp, data.prepare(exp.data, progress=False))["train"].dataset.transform
    assert isinstance(transform, data.BatchAugment) == batched
    _workers_agree(tmp_path, augment)


@pytest.mark.slow
def test_workers_check_catches_batched_draws_from_the_process_rng(tmp_path, monkeypatch):
    """Broken variant: the batched path's draws taken from the loading process's RNG, which each
    worker seeds differently."""
    _images(tmp_path)
    monkeypatch.setattr(data, "sample_uniforms", lambda seed, epoch, indices, stream: torch.rand(len(indices), dtype=torch.float64))
    with pytest.raises(AssertionError):
        _workers_agree(tmp_path, BATCHED)


def test_the_batched_path_needs_batchable_ops_and_one_image_size():
    same = [torch.zeros(3, 40, 48, dtype=torch.uint8)] * 3
    mixed = same + [torch.zeros(3, 48, 40, dtype=torch.uint8)]
    flip, jitter = config.HorizontalFlip(op="horizontal_flip"), config.ColorJitter(op="color_jitter", brightness=0.2)
    assert isinstance(data.split_transform([flip], 32, same), data.BatchAugment)
    assert isinstance(data.split_transform([], 32, same), data.BatchAugment)
    assert not isinstance(data.split_transform([flip], 32, mixed), data.BatchAugment)
    assert not isinstance(data.split_transform([flip, jitter], 32, same), data.BatchAugment)


FROZEN = {"arch": "resnet18", "weights": "none", "freeze_backbone": True}


def _fit_head(tmp_path, augment: list, feature_cache: bool, epochs: int = 2):
    """Two epochs of run()'s own pieces (no checkpoints): the head's weights, val logits, cache used."""
    exp = config.validate({
        "name": "head", "device": "cpu", "augment": augment, "model": FROZEN,
        "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "image_size": 32,
                 "batch_size": 4, "eval_batch_size": 8},
        "train": {"feature_cache": feature_cache},
    })
    cpu = torch.device("cpu")
    dataset = data.prepare(exp.data, progress=False)
    torch.manual_seed(0)
    model = models.build(exp.model, len(dataset.classes), cpu, exp.train.channels_last)
    initial = model.head.weight.detach().clone()
    loaders = data.build_loaders(exp, dataset)
    opt = train.build_optimization(exp.model_copy(update={"train": exp.train.model_copy(update={"epochs": epochs})}),
                                   model, len(loaders["train"]))
    feed = train.build_feed(exp, model, loaders, cpu)
    for epoch in range(1, epochs + 1):
        train.train_one_epoch(feed, opt, epoch, progress=False)
    logits, _ = evaluate.logits_of(feed.net, feed.loaders["val"], feed.inputs)
    return initial, model.state_dict(), logits, feed.feature_cache


def test_feature_cache_trains_the_same_head(tmp_path):
    """A frozen backbone without augmentation: caching its features gives the uncached run's head."""
    _images(tmp_path)
    initial, cached, cached_logits, used = _fit_head(tmp_path, [], feature_cache=True)
    _, plain, plain_logits, plain_used = _fit_head(tmp_path, [], feature_cache=False)
    assert used and not plain_used
    assert not torch.allclose(plain["head.weight"], initial), "the head did not train"
    for key in plain:
        if key.startswith("backbone."):
            assert torch.equal(cached[key], plain[key]), key
    # Same batches in the same order; only the backbone's batch grouping differs (fp rounding).
    torch.testing.assert_close(cached["head.weight"], plain["head.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached["head.bias"], plain["head.bias"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_feature_cache_needs_a_deterministic_pipeline(tmp_path):
    """With augmentation the cache would be inexact, so the backbone runs every epoch instead."""
    _images(tmp_path, per_class=2)
    *_, used = _fit_head(tmp_path, [{"op": "horizontal_flip"}], feature_cache=True, epochs=1)
    assert not used
