"""Claims 10 and 11 (normalisation part): BatchNorm in eval mode, and imgcls's Normalize.

`data.Normalize` is what every batch goes through on its way to the model: uint8 (N, 3, H, W) in,
float scaled to [0, 1] and standardised per channel out.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from imgcls import config as C
from imgcls import data

from .strategies import generator, scratch_cnns, seeds
from .support import built, falsify

# ------------------------------------------------------------------------------------ claim 10


def randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters away from their identity defaults."""
    g = generator(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def check_independent_of_batch(forward, n: int, size: int, seed: int, dtype=torch.float64) -> None:
    """Each image's output is the same alone, in its batch, and in a batch of other images."""
    g = generator(seed)
    x = (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    others = (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4  # float32: batched and single convolutions round differently
    with torch.no_grad():
        together = forward(x)
        for i in range(n):
            mixed = others.clone()
            mixed[i] = x[i]
            assert torch.allclose(forward(mixed)[i], together[i], rtol=tol, atol=tol)
            assert torch.allclose(forward(x[i : i + 1])[0], together[i], rtol=tol, atol=tol)


batches = st.tuples(st.integers(2, 4), st.integers(0, 8), seeds)


@given(scratch_cnns(batch_norm=st.just(True)), batches)
def test_batchnorm_in_eval_mode_ignores_the_rest_of_the_batch(cfg, batch):
    """BatchNorm in eval mode does not depend on the other images in the batch (scratch CNN with batch_norm)."""
    n, extra, seed = batch
    model = randomise_batchnorm(copy.deepcopy(built(cfg, 3)).double(), seed).eval()
    check_independent_of_batch(model, n, cfg.min_image_size + extra, seed)


FROZEN = C.ResNet(arch="resnet18", weights="none", freeze_backbone=True)


@settings(max_examples=5)
@given(batches)
def test_frozen_backbone_batchnorm_ignores_the_batch_even_while_training(batch):
    """A frozen ResNet18 backbone keeps its BatchNorm in eval mode while the model trains, so its features do
    not depend on the other images in the batch either."""
    n, _, seed = batch
    model = randomise_batchnorm(copy.deepcopy(built(FROZEN, 3)), seed).train()
    assert not any(m.training for m in model.backbone.modules())
    check_independent_of_batch(model.backbone, n, 32, seed, torch.float32)


def test_batch_independence_check_catches_batch_statistics():
    """Broken variants: BatchNorm in train mode (batch statistics), in the scratch CNN and an unfrozen ResNet18."""
    cfg = C.ScratchCNN(arch="scratch_cnn", channels=[3, 3], dropout=0.0, batch_norm=True)
    model = copy.deepcopy(built(cfg, 3)).double().train()
    falsify(lambda b: check_independent_of_batch(model, b[0], 4 + b[1], b[2]), batches)
    unfrozen = C.ResNet(arch="resnet18", weights="none", freeze_backbone=False)
    model = copy.deepcopy(built(unfrozen, 3)).train()
    falsify(
        lambda b: check_independent_of_batch(model.backbone, b[0], 32, b[2], torch.float32), batches, max_examples=3
    )


# ------------------------------------------------------------------------------------ claim 11

images = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.uint8, (shape[0], 3, shape[1], shape[2])).map(torch.from_numpy)
)
HALF = data.normalization(C.DataConfig(train_dir="t", val_dir="v", normalize="half"))


def check_half_maps_unit_interval(normalize, x: torch.Tensor) -> None:
    """[0, 1] (uint8 0..255) onto [-1, 1]: 0 -> -1, 255 -> 1, linear in between."""
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, x.double().div(255).sub(0.5).div(0.5).float(), atol=1e-6)
    ends = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    assert torch.allclose(ends, torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2), atol=1e-6)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6


@given(images, st.booleans())
def test_normalize_half_maps_0_1_onto_minus_1_1(x, channels_last):
    """Normalize(mean=0.5, std=0.5) maps [0, 1] onto [-1, 1] (data.normalize = "half" on uint8 images)."""
    assert HALF == ([0.5] * 3, [0.5] * 3)
    check_half_maps_unit_interval(data.Normalize(*HALF, channels_last), x)


def test_half_check_catches_missing_scaling_and_swapped_stats():
    """Broken variants: standardising 0..255 without dividing by 255, and multiplying by std instead of dividing."""
    falsify(lambda x: check_half_maps_unit_interval(lambda t: (t.float() - 0.5) / 0.5, x), images)
    falsify(lambda x: check_half_maps_unit_interval(lambda t: (t.float() / 255 - 0.5) * 0.5, x), images)


stats = st.builds(
    lambda mean, std: C.NormalizeStats(mean=mean, std=std),
    st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    st.lists(st.floats(0.01, 2), min_size=3, max_size=3),  # a std of 1e-300 overflows float32: no one's data
)


@given(images, stats, st.booleans())
def test_normalize_gives_the_same_bits_from_either_layout_into_either(x, stats, channels_last):
    """The keyed ops hand Normalize channels_last batches, transforms v2 contiguous ones; a network
    runs in either format. Every combination gives the same values, in the network's format."""
    normalize = data.Normalize(stats.mean, stats.std, channels_last)
    want = torch.channels_last if channels_last else torch.contiguous_format
    planar, interleaved = normalize(x), normalize(x.contiguous(memory_format=torch.channels_last))
    assert planar.is_contiguous(memory_format=want) and interleaved.is_contiguous(memory_format=want)
    assert torch.equal(planar, interleaved)
    assert torch.equal(planar, data.Normalize(stats.mean, stats.std, not channels_last)(x))


@given(images, stats)
def test_normalize_standardises_each_channel(x, stats):
    """Normalize with per-channel statistics computes (x / 255 - mean) / std for each channel."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (stats.mean, stats.std))
    out = data.Normalize(stats.mean, stats.std, channels_last=False)(x)
    expected = (x.double() / 255 - mean) / std
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * float(1 / std.min()))
