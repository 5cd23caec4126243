"""imgcls.train: the frozen-feature cache trains the same head as the uncached loop, and only
where it is exact; the early-stopping monitor never takes a NaN or infinite metric as best; class
weights and the balanced sampler are what they claim, and a run using them resumes bit-identically."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from imgcls import checkpoint, config, data, evaluate, models, run, runtime, train
from imgcls.errors import ConfigError

from .fixtures import experiment, make_cue_data, make_data, train_tiny, whole_and_resumed


# ------------------------------------------------------------------------------ feature cache


FROZEN = {"arch": "resnet18", "weights": "none", "freeze_backbone": True}


def _fit_head(tmp_path, augment: list, feature_cache: bool, epochs: int = 2, ema_decay: float | None = None):
    """Two epochs of run()'s own pieces (no checkpoints): the head's weights, the val logits of what
    validation judges (the weight average, with ema_decay), cache used."""
    exp = config.validate({
        "name": "head", "device": "cpu", "augment": augment, "model": FROZEN,
        "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "image_size": 32,
                 "batch_size": 4, "eval_batch_size": 8},
        "train": {"feature_cache": feature_cache, "ema_decay": ema_decay},
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
    logits, _ = evaluate.logits_of(feed.judged(opt), feed.loaders["val"], feed.inputs)
    state = model.state_dict() if opt.ema is None else opt.ema.model.state_dict()
    return initial, state, logits, feed.feature_cache


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


def test_the_weight_average_of_a_cached_head_is_the_uncached_runs_and_keeps_the_backbone(tmp_path):
    """train.ema_decay with the feature cache: validation judges the average's head on the cached
    features, as the uncached run judges the whole averaged model; the average's backbone is the
    frozen backbone, bit for bit."""
    make_cue_data(tmp_path)
    _, cached, cached_logits, used = _fit_head(tmp_path, [], feature_cache=True, ema_decay=0.5)
    _, plain, plain_logits, plain_used = _fit_head(tmp_path, [], feature_cache=False, ema_decay=0.5)
    *_, raw_logits, _ = _fit_head(tmp_path, [], feature_cache=True)
    assert used and not plain_used
    torch.manual_seed(0)  # as _fit_head: the backbone it started from
    start = models.build(config.ResNet(**FROZEN), 3, torch.device("cpu"), True).state_dict()
    backbone = [k for k in start if k.startswith("backbone.")]
    assert all(torch.equal(cached[k], start[k]) and torch.equal(plain[k], start[k]) for k in backbone)
    torch.testing.assert_close(cached["head.weight"], plain["head.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached_logits, raw_logits), "validation did not judge the average"


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

    def three_dogs(base):
        for extra in sorted((base / "data" / "train" / "dog").iterdir())[3:]:
            extra.unlink()

    whole, resumed = whole_and_resumed(tmp_path, overrides, three_dogs)
    assert whole == resumed


# ------------------------------------------------------------------- fp16, clipping, weight average


def _opt(model: nn.Module, clip: float | None = None, ema_decay: float | None = None, lr: float = 0.1) -> train.Optimization:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ema = None if ema_decay is None else train.Ema(model, ema_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train.Optimization(nn.CrossEntropyLoss(), optimizer, train.Schedule(None, False), scaler, clip, ema)


def _scratch(seed: int) -> models.Classifier:
    torch.manual_seed(seed)
    return models.build_model(config.ScratchCNN(arch="scratch_cnn", channels=[4], hidden=8, batch_norm=True), 3)


def test_fp16_on_the_cpu_is_refused_naming_the_key_before_any_image_is_decoded(tmp_path, monkeypatch):
    make_data(tmp_path)
    with pytest.raises(ConfigError, match='train.precision = "fp16".*"bf16".*"fp32"'):
        config.load(experiment(tmp_path, {"train": {"precision": "fp16"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = config.load(experiment(tmp_path, {"device": "auto", "train": {"precision": "fp16"}}))
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("images were decoded"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match='train.precision = "fp16".*"bf16".*"fp32"'):
        run.run(exp, progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="train.precision"):
        runtime.resolve_device("auto", "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 trains on CUDA only")
def test_fp16_trains_on_cuda_with_a_gradient_scaler_that_resumes(tmp_path):
    train_tiny(tmp_path, {"device": "cuda", "train": {"precision": "fp16", "epochs": 2}})
    saved = checkpoint.load(tmp_path / "runs" / "tiny" / "last.safetensors")
    assert "scaler" in str(saved.meta["resume"])  # the scale and its growth counter travel with the run
    assert math.isfinite(json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["val"]["loss"])


@given(seed=st.integers(0, 2**16), max_norm=st.floats(1e-4, 10), scale=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_global_gradient_norm_and_leaves_smaller_ones_alone(seed, max_norm, scale):
    """clip_grad_norm: after the step, the trainable parameters' gradients have global L2 norm
    min(norm, max_norm) and their direction unchanged."""
    model = _scratch(seed)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])) * scale
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], retain_graph=True)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    train.optimizer_step(model, _opt(model, clip=max_norm, lr=0.0), loss)
    clipped = [p.grad for p in model.parameters()]
    clipped_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert clipped_norm <= max_norm * (1 + 1e-4)
    # abs_tol: torch divides by norm + 1e-6, which shortens a clipped norm by at most 1e-6.
    assert math.isclose(clipped_norm, min(norm, max_norm), rel_tol=1e-4, abs_tol=2e-6)
    ratio = clipped_norm / norm
    assert all(torch.allclose(c, g * ratio, rtol=1e-4, atol=1e-12) for c, g in zip(clipped, grads))


@given(seed=st.integers(0, 2**16), decay=st.floats(0.01, 0.999), steps=st.integers(1, 5))
def test_the_average_after_k_steps_is_the_closed_form_sum(seed, decay, steps):
    """ema_k = decay**k * w_0 + sum_i (1 - decay) * decay**(k - i) * w_i over every floating-point
    tensor (BatchNorm statistics too); the batch counter is copied."""
    model = _scratch(seed).train()
    opt = _opt(model, ema_decay=decay)
    states = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 8, 8, generator=generator)), torch.tensor([0, 1, 2, 0]))
        train.optimizer_step(model, opt, loss)
        states.append({k: v.double().clone() for k, v in model.state_dict().items()})
    for key, ema in opt.ema.model.state_dict().items():
        if not ema.is_floating_point():
            assert torch.equal(ema, model.state_dict()[key])
            continue
        closed = decay**steps * states[0][key] + sum((1 - decay) * decay ** (steps - i) * states[i][key] for i in range(1, steps + 1))
        assert torch.allclose(ema.double(), closed, rtol=1e-5, atol=1e-6), key


@given(seed=st.integers(0, 2**16), decay=st.floats(0.01, 0.999), steps=st.integers(1, 4))
def test_the_average_that_skips_frozen_weights_has_the_bits_of_one_that_averages_every_tensor(seed, decay, steps):
    """Ema.update leaves frozen weights out; the average is still, bit for bit, a lerp of every floating
    tensor of the state dict (BatchNorm's statistics of a frozen backbone included) and a copy of the rest."""
    model = _scratch(seed).train()
    model.backbone[0].requires_grad_(False)  # the first conv frozen; its BatchNorm still updates statistics
    opt = _opt(model, ema_decay=decay)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 8, 8, generator=generator)), torch.tensor([0, 1, 2, 0]))
        train.optimizer_step(model, opt, loss)
        for key, current in model.state_dict().items():
            if current.is_floating_point():
                reference[key].lerp_(current, 1.0 - decay)
            else:
                reference[key].copy_(current)
    averaged = opt.ema.model.state_dict()
    assert averaged.keys() == reference.keys()
    assert all(torch.equal(averaged[k], reference[k]) for k in reference), [k for k in reference if not torch.equal(averaged[k], reference[k])]


@given(value=st.floats(-1e30, 1e30, allow_subnormal=True), decay=st.floats(1e-6, 1 - 1e-6))
def test_the_average_of_a_tensor_that_never_changes_is_that_tensor_bit_for_bit(value, decay):
    """A frozen backbone's average stays its weights exactly (lerp, not decay * a + (1 - decay) * a)."""
    model = nn.Linear(1, 3)
    with torch.no_grad():
        model.weight.fill_(value)
    ema = train.Ema(model, decay)
    for _ in range(3):
        ema.update(model)
    assert torch.equal(ema.model.weight, model.weight)


def test_a_resumed_run_with_a_weight_average_is_bit_identical_and_predicts_with_the_average(tmp_path):
    """train.ema_decay: a run stopped after epoch 1 and resumed ends with the uninterrupted run's bits
    (weights and their average); best holds both, and evaluation loads the average."""
    overrides = {"train": {"ema_decay": 0.7, "epochs": 2, "clip_grad_norm": 0.5}}
    whole, resumed = whole_and_resumed(tmp_path, overrides)
    assert whole == resumed
    run_dir = tmp_path / "whole" / "runs" / "tiny"
    best = checkpoint.load(run_dir / "best.safetensors")
    assert best.ema.keys() == best.model.keys()
    assert any(not torch.equal(best.ema[k], best.model[k]) for k in best.model)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "whole")
        trained = evaluate.load_for_inference(str(run_dir / "config.toml"), str(run_dir / "best.safetensors"))
    assert all(torch.equal(v, best.ema[k]) for k, v in trained.model.state_dict().items())
