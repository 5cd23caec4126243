"""Claims 4 (pooling part) and 5: max pooling, global average pooling, and the scratch CNN's input sizes.

The pooling layers are the ones `models.build_model` puts in the scratch CNN.
"""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from imgcls import config as C
from imgcls import models
from imgcls.errors import ConfigError

from .strategies import generator, scratch_cnns, seeds
from .support import falsify


def layers(cfg: C.ScratchCNN, kind: type) -> list[nn.Module]:
    found = [m for m in models.build_model(cfg, 2).modules() if isinstance(m, kind)]
    assert found, f"no {kind.__name__} in the scratch CNN"
    return found


DEFAULT = C.ScratchCNN(arch="scratch_cnn")
maps = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 33), st.integers(2, 33), seeds)


# ------------------------------------------------------------------------------------- claim 4


def check_halves(pool, n: int, c: int, h: int, w: int, seed: int) -> None:
    x = torch.rand(n, c, h, w, generator=generator(seed))
    assert pool(x).shape == (n, c, h // 2, w // 2)


@given(maps)
def test_maxpool2_halves_height_and_width_with_floor(m):
    """MaxPool2d(2) halves height and width, rounding down, for every size of at least 2."""
    for pool in layers(DEFAULT, nn.MaxPool2d):
        check_halves(pool, *m)


def test_halving_check_catches_ceil_mode_and_strided_slicing():
    """Broken variants: ceil_mode=True and x[..., ::2, ::2] both round odd sizes up."""
    falsify(lambda m: check_halves(nn.MaxPool2d(2, ceil_mode=True), *m), maps)
    falsify(lambda m: check_halves(lambda x: x[..., ::2, ::2], *m), maps)


def permute_within_windows(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Shuffle the 4 values of every full 2x2 window independently; rows/columns left over by floor stay."""
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    windows = x[:, :, : 2 * h2, : 2 * w2].reshape(n, c, h2, 2, w2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h2, w2, 4)
    order = torch.rand(windows.shape, generator=generator(seed)).argsort(-1)
    shuffled = (
        windows.gather(-1, order).reshape(n, c, h2, w2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, 2 * w2)
    )
    out = x.clone()
    out[:, :, : 2 * h2, : 2 * w2] = shuffled
    return out


def check_window_permutation_invariance(pool, n: int, c: int, h: int, w: int, seed: int) -> None:
    x = torch.rand(n, c, h, w, generator=generator(seed))
    assert torch.equal(pool(x), pool(permute_within_windows(x, seed + 1)))


@given(maps)
def test_maxpool2_is_invariant_to_permutations_inside_each_window(m):
    """MaxPool2d(2) is invariant to permutations inside each 2x2 window."""
    for pool in layers(DEFAULT, nn.MaxPool2d):
        check_window_permutation_invariance(pool, *m)


def test_permutation_check_catches_subsampling_and_overlapping_pools():
    """Broken variants: keeping the top-left pixel, and a 3x3 pool with stride 2 (windows overlap)."""
    falsify(lambda m: check_window_permutation_invariance(lambda x: x[..., ::2, ::2], *m), maps)
    falsify(lambda m: check_window_permutation_invariance(nn.MaxPool2d(3, 2, padding=1), *m), maps)


# ------------------------------------------------------------------------------------- claim 5


def check_global_average(pool, n: int, c: int, h: int, w: int, seed: int) -> None:
    x = torch.rand(n, c, h, w, dtype=torch.float64, generator=generator(seed))
    out = pool(x)
    assert out.shape == (n, c)  # one value per channel, ready for the head's Linear
    assert torch.allclose(out, x.mean((2, 3)), rtol=1e-12, atol=1e-12)


gap_maps = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 33), st.integers(1, 33), seeds)


@given(gap_maps)
def test_global_average_pooling_is_1x1_spatial_mean(m):
    """Global average pooling yields one value per channel for any input size, the spatial mean."""
    (pool,) = layers(DEFAULT, models.GlobalAvgPool)
    check_global_average(pool, *m)


def test_global_average_check_catches_max_and_fixed_size_pooling():
    """Broken variants: global max pooling (one value, but not the mean) and AvgPool2d(2) (the mean of 2x2 only)."""
    falsify(lambda m: check_global_average(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()), *m), gap_maps)
    falsify(lambda m: check_global_average(nn.AvgPool2d(2), *m), gap_maps, raises=(RuntimeError,))


def check_logits_shape(build, cfg: C.ScratchCNN, n: int, k: int, extra_h: int, extra_w: int) -> None:
    torch.manual_seed(0)
    model = build(cfg, k).eval()
    x = torch.rand(n, 3, cfg.min_image_size + extra_h, cfg.min_image_size + extra_w)
    with torch.no_grad():
        assert model(x).shape == (n, k)


inputs = st.tuples(
    scratch_cnns(max_blocks=4, max_channels=4),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(0, 20),
    st.integers(0, 20),
)


@given(inputs)
def test_scratch_cnn_returns_logits_for_every_accepted_size(args):
    """The scratch CNN returns (N, num_classes) logits for every input size it accepts (height and width
    at least 2**blocks, square or not)."""
    check_logits_shape(models.build_model, *args)


def test_logits_shape_check_catches_a_head_without_global_pooling():
    """Broken variant: flattening the feature map instead of pooling it fixes the head to one input size."""

    def flatten_head(cfg, k):
        model = models.build_model(cfg, k)
        model.backbone[-1] = nn.Flatten()  # no global pooling: the Linear sees C*H*W features
        return model

    falsify(lambda args: check_logits_shape(flatten_head, *args), inputs, raises=(RuntimeError,))


def experiment(model: C.ScratchCNN, image_size: int) -> dict:
    return {
        "name": "x",
        "data": {"train_dir": "t", "val_dir": "v", "image_size": image_size},
        "model": model.model_dump(),
    }


def check_refuses_too_small(validate, cfg: C.ScratchCNN, image_size: int) -> None:
    """The schema accepts an image size exactly when the model can pool it, and says so by key."""
    torch.manual_seed(0)
    model = models.build_model(cfg, 2).eval()
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, image_size, image_size))
        runs = True
    except RuntimeError:  # torch: "Output size is too small", deep inside a MaxPool
        runs = False
    try:
        validate(experiment(cfg, image_size))
        accepted = True
    except ConfigError as e:
        accepted = False
        message = str(e)
        assert "data.image_size" in message and str(cfg.min_image_size) in message and "scratch_cnn" in message, message
    assert accepted == runs, (image_size, accepted, runs)


@st.composite
def sizes(draw) -> tuple[C.ScratchCNN, int]:
    """A model and an image size, half of them within 3 pixels of the model's minimum 2**blocks."""
    cfg = draw(scratch_cnns(max_blocks=6, max_channels=2))
    near = st.integers(-3, 3).map(lambda d: max(8, 2 ** len(cfg.channels) + d))
    return cfg, draw(st.one_of(near, st.integers(8, 70)))


@given(sizes())
@example((C.ScratchCNN(arch="scratch_cnn", channels=[1, 1, 1, 1]), 15))  # one pixel short of 2**4
def test_scratch_cnn_refuses_sizes_too_small_for_its_pooling(args):
    """The scratch CNN refuses sizes too small for its pooling with a clear error: the experiment fails to
    load with a ConfigError naming data.image_size and the minimum, for exactly the sizes its MaxPools cannot
    halve down to one pixel."""
    check_refuses_too_small(C.validate, *args)


def test_refusal_check_catches_a_wrong_minimum(monkeypatch):
    """Broken variants: a schema whose minimum is too low (2 * blocks) or too high (2**blocks + 1)."""
    with monkeypatch.context() as m:
        m.setattr(C.ScratchCNN, "min_image_size", property(lambda self: 2 * len(self.channels)))
        falsify(lambda args: check_refuses_too_small(C.validate, *args), sizes())
    with monkeypatch.context() as m:
        m.setattr(C.ScratchCNN, "min_image_size", property(lambda self: 2 ** len(self.channels) + 1))
        falsify(lambda args: check_refuses_too_small(C.validate, *args), sizes())
