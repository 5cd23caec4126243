"""imgcls.train: the frozen-feature cache trains the same head as the uncached loop, and only
where it is exact; the early-stopping monitor never takes a NaN or infinite metric as best."""

from __future__ import annotations

import pytest
import torch

from imgcls import config, data, evaluate, models, train

from .fixtures import make_cue_data


# ------------------------------------------------------------------------------ feature cache


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
                                   model, len(loaders["train"]), data.class_counts(dataset.splits["train"], dataset.classes))
    feed = train.build_feed(exp, model, loaders, cpu)
    for epoch in range(1, epochs + 1):
        train.train_one_epoch(feed, opt, epoch, progress=False)
    logits, _ = evaluate.logits_of(feed.net, feed.loaders["val"], feed.inputs)
    return initial, model.state_dict(), logits, feed.feature_cache


def test_feature_cache_trains_the_same_head(tmp_path):
    """A frozen backbone without augmentation: caching its features gives the uncached run's head."""
    make_cue_data(tmp_path)
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
    make_cue_data(tmp_path, per_class=2)
    *_, used = _fit_head(tmp_path, [{"op": "horizontal_flip"}], feature_cache=True, epochs=1)
    assert not used


# ------------------------------------------------------------------ case 19: non-finite numbers


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_non_finite_metric_never_becomes_best(mode):
    for bad in (float("nan"), float("inf") if mode == "min" else float("nan")):
        monitor = train.Monitor(mode, patience=2)
        assert monitor.update(1, bad) == (False, False)  # not even as the first value
        assert monitor.best is None and monitor.best_epoch == 0
        assert monitor.update(2, 0.5)[0]
        assert monitor.update(3, bad) == (False, False)
        assert monitor.update(4, bad) == (False, True)  # counts as no improvement: patience runs out
        assert (monitor.best, monitor.best_epoch) == (0.5, 2)
