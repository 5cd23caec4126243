"""imgcls.train: the frozen-feature cache trains the same head as the uncached loop, and only
where it is exact; the early-stopping monitor never takes a NaN or infinite metric as best; class
weights and the balanced sampler are what they claim, and a run using them resumes bit-identically."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from imgcls import config, data, evaluate, models, run, train

from .fixtures import experiment, fingerprint, make_cue_data, make_data


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


def test_test_time_augmentation_runs_the_whole_model_on_images_where_features_are_cached(tmp_path):
    """Cached features are those of the unmirrored crop: with tta = "flip" the run's final evaluation
    takes the whole model over the images, the mean of the logits of each image and its mirror."""
    make_cue_data(tmp_path, per_class=2)
    exp = config.validate({
        "name": "head", "device": "cpu", "model": FROZEN,
        "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "image_size": 32},
    })
    cpu = torch.device("cpu")
    dataset = data.prepare(exp.data, progress=False)
    model = models.build(exp.model, len(dataset.classes), cpu, exp.train.channels_last)
    feed = train.build_feed(exp, model, data.build_loaders(exp, dataset), cpu)
    assert feed.feature_cache and feed.evaluation("none") == (feed.net, feed.loaders, feed.inputs)
    net, loaders, inputs = feed.evaluation("flip")
    logits, _ = evaluate.logits_of(net, loaders["val"], inputs, "flip")
    images = torch.cat([x for x, _ in feed.image_loaders["val"]])
    by_hand = evaluate.forward(model, images, feed.image_inputs) + evaluate.forward(model, images.flip(-1), feed.image_inputs)
    torch.testing.assert_close(logits, by_hand / 2, rtol=1e-4, atol=1e-5)  # batches differ only in grouping


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


# --------------------------------------------------------------------------- class imbalance

# Imbalanced label lists: 2..5 classes of 1..40 images each, in any order.
label_lists = st.lists(st.integers(1, 40), min_size=2, max_size=5).flatmap(
    lambda counts: st.permutations([c for c, n in enumerate(counts) for _ in range(n)])
)


@given(labels=label_lists)
def test_balanced_class_weights_are_scikit_learns(labels):
    classes = [f"c{k}" for k in range(max(labels) + 1)]
    split = data.Split("train", "train", [f"{i}.png" for i in range(len(labels))], list(labels))
    got = train.class_weights("balanced", data.class_counts(split, classes))
    want = compute_class_weight("balanced", classes=np.arange(len(classes)), y=np.array(labels))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@given(logits=st.lists(st.lists(st.floats(-8, 8), min_size=3, max_size=3), min_size=1, max_size=6),
       data_=st.data())
def test_the_training_loss_is_the_weighted_mean_of_the_per_image_losses(logits, data_):
    """sum_i w[y_i] * -log softmax(x_i)[y_i] / sum_i w[y_i], with w from the table (unnamed classes 1.0)."""
    labels = data_.draw(st.lists(st.integers(0, 2), min_size=len(logits), max_size=len(logits)))
    table = data_.draw(st.dictionaries(st.sampled_from(["apple", "kiwi", "plum"]), st.floats(0.01, 100), max_size=3))
    exp = config.validate({"name": "w", "data": {"train_dir": "t", "val_dir": "v"}, "model": {"arch": "scratch_cnn"},
                           "train": {"class_weights": table}})
    counts = {"apple": 1, "kiwi": 1, "plum": 1}
    opt = train.build_optimization(exp, nn.Linear(3, 3), 1, counts)
    weight = [table.get(name, 1.0) for name in counts]
    per_image = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels)]
    want = sum(weight[y] * loss for y, loss in zip(labels, per_image)) / sum(weight[y] for y in labels)
    got = opt.loss_fn(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)).item()
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), (got, want)


def test_balanced_draws_are_a_function_of_seed_and_epoch():
    labels = [0] * 30 + [1] * 5 + [2] * 2
    draws = lambda seed, epoch: _draws(labels, seed, epoch, batch_size=4)
    assert draws(7, 3) == draws(7, 3)
    assert draws(7, 3) != draws(7, 4) and draws(7, 3) != draws(8, 3)
    keys = draws(7, 3)
    assert len(keys) == len(labels) - 1  # a trailing batch of one is dropped, as when shuffling
    repeats = defaultdict(list)
    for key in keys:
        repeats[key % len(labels)].append(key)
    assert max(map(len, repeats.values())) > 1
    assert all(got == [i + k * len(labels) for k in range(len(got))] for i, got in repeats.items())  # i, i + n, ...


def _draws(labels: list[int], seed: int, epoch: int, batch_size: int) -> list[int]:
    """The keys of one epoch's batches, in order (each batch also names its epoch: left out here)."""
    sampler = data.EpochBatches(labels, batch_size, "balanced", seed)
    sampler.set_epoch(epoch)
    return [key for batch in sampler for batch_epoch, key in batch if batch_epoch == epoch]


@given(labels=label_lists, seed=st.integers(0, 2**32 - 1))
def test_balanced_draws_give_every_class_a_near_equal_share(labels, seed):
    """Over enough epochs to draw about 4000 keys, each class's count lies within 5 standard deviations
    of total / n_classes; drawing images uniformly would put some class beyond twice that bound."""
    n_classes, n = max(labels) + 1, len(labels)
    epochs = -(-4000 // n)
    bound = 5 * math.sqrt(epochs * n * (1 / n_classes) * (1 - 1 / n_classes))
    by_image = max(abs(epochs * n * labels.count(c) / n - epochs * n / n_classes) for c in range(n_classes))
    assume(by_image > 2 * bound)  # an imbalance that sampling by image would show
    drawn = Counter(labels[key % n] for epoch in range(epochs) for key in data.balanced_keys(labels, seed + epoch))
    total = sum(drawn.values())
    assert all(abs(drawn[c] - total / n_classes) <= bound for c in range(n_classes)), (drawn, bound)


def test_a_repeated_image_is_augmented_anew(tmp_path):
    """Key i + n is image i with its label, and its own augmentation draws."""
    make_data(tmp_path)
    exp = config.validate({"name": "r", "seed": 1, "data": {"train_dir": str(tmp_path / "data/train"),
                           "val_dir": str(tmp_path / "data/val"), "image_size": 16}, "model": {"arch": "scratch_cnn"},
                           "augment": [{"op": "random_resized_crop", "scale": [0.3, 1.0]}]})
    dataset = data.build_loaders(exp, data.prepare(exp.data, progress=False))["train"].dataset
    n = len(dataset)
    pairs = [(dataset[(1, i)], dataset[(1, i + n)]) for i in range(n)]
    assert all(first[1] == repeat[1] == dataset.split.labels[i] for i, (first, repeat) in enumerate(pairs))
    assert sum(not torch.equal(first[0], repeat[0]) for first, repeat in pairs) > n // 2


@pytest.mark.parametrize("scheduler", [{"name": "cosine", "warmup_epochs": 1}, {"name": "plateau", "warmup_epochs": 1}])
def test_a_resumed_run_with_balanced_sampling_and_weights_is_bit_identical(tmp_path, scheduler):
    """An imbalanced tiny run (8 cat, 3 dog) stopped after epoch 1 and resumed ends with the bits of
    the uninterrupted run: the draws depend on (seed, epoch) only, and the warm-up's state resumes."""
    overrides = {"data": {"sampler": "balanced"}, "train": {"class_weights": "balanced", "epochs": 2}, "scheduler": scheduler}
    prints = []
    for name, stops in (("whole", [None]), ("resumed", [1, None])):
        base = tmp_path / name
        make_data(base)
        for extra in sorted((base / "data" / "train" / "dog").iterdir())[3:]:
            extra.unlink()
        exp = config.load(experiment(base, overrides))
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(base)
            for i, stop in enumerate(stops):
                run.run(exp, resume=i > 0, progress=False, stop_after=stop)
        prints.append(fingerprint(base / "runs" / "tiny"))
    assert prints[0] == prints[1]
