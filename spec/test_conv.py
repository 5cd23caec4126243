"""Claims 1-4 (convolution part): output sizes, the 3x3 window, receptive field, translation equivariance.

The layers under test are the ones imgcls builds: every Conv2d of the scratch CNN (and of ResNet18
where a claim is about any layer), taken out of `models.build_model`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from imgcls import config as C
from imgcls import models

from .strategies import conv_params, generator, scratch_cnns, seeds
from .support import built, falsify


def convs(cfg: C.ScratchCNN) -> list[nn.Conv2d]:
    torch.manual_seed(0)
    return [m.double() for m in models.build_model(cfg, 2).modules() if isinstance(m, nn.Conv2d)]


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    """floor((H + 2p - k_eff) / s) + 1 with the dilated kernel's extent k_eff = d(k - 1) + 1 (k_eff = k at d = 1)."""
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


# ------------------------------------------------------------------------------------- claim 1


def check_keeps_size(conv: nn.Module, n: int, h: int, w: int) -> None:
    x = torch.zeros(n, conv.in_channels, h, w, dtype=torch.float64)
    assert conv(x).shape == (n, conv.out_channels, h, w)


sizes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40))


@given(scratch_cnns(), sizes)
def test_conv3x3_pad1_keeps_height_and_width(cfg, size):
    """A 3x3 convolution with padding=1 and stride 1 keeps height and width, for any size and channels."""
    for conv in convs(cfg):
        assert (conv.kernel_size, conv.padding, conv.stride) == ((3, 3), (1, 1), (1, 1))
        check_keeps_size(conv, *size)


def test_keeps_size_check_catches_unpadded_and_strided_convs():
    """Broken variants: padding 0 shrinks by 2; stride 2 halves."""
    falsify(lambda s: check_keeps_size(nn.Conv2d(2, 2, 3, padding=0).double(), *s), sizes, raises=(RuntimeError,))
    falsify(lambda s: check_keeps_size(nn.Conv2d(2, 2, 3, padding=1, stride=2).double(), *s), sizes)


# ------------------------------------------------------------------------------------- claim 2


def check_output_size(formula, q: dict[str, int]) -> None:
    conv = nn.Conv2d(q["cin"], q["cout"], q["k"], stride=q["s"], padding=q["p"], dilation=q["d"])
    expected = [formula(size, q["k"], q["s"], q["p"], q["d"]) for size in (q["h"], q["w"])]
    x = torch.zeros(1, q["cin"], q["h"], q["w"])
    if min(expected) < 1:  # the kernel does not fit even once: the layer must refuse, not return an empty map
        with pytest.raises(RuntimeError):
            conv(x)
        return
    assert list(conv(x).shape[2:]) == expected


@given(conv_params())
@example({"h": 5, "w": 5, "k": 3, "s": 1, "p": 0, "d": 3, "cin": 1, "cout": 1})  # d(k-1)+1 = 7 > 5: refused
def test_conv_output_size_formula(q):
    """The general output size is floor((H + 2p - k) / s) + 1 for any kernel/stride/padding/dilation the
    layer accepts (with dilation d, k is the dilated extent d(k - 1) + 1); it refuses the rest."""
    check_output_size(conv_out, q)


def test_output_size_check_catches_wrong_formulas():
    """Broken variants: ignoring dilation, and rounding up instead of down."""
    falsify(
        lambda q: check_output_size(lambda n, k, s, p, d: (n + 2 * p - k) // s + 1, q),
        conv_params(),
        raises=(RuntimeError,),
    )
    falsify(
        lambda q: check_output_size(lambda n, k, s, p, d: -(-(n + 2 * p - d * (k - 1) - 1) // s) + 1, q),
        conv_params(),
        raises=(RuntimeError,),  # rounding up also "accepts" kernels the layer refuses: a refutation too
    )


def check_model_layers_obey_formula(formula, model: nn.Module, x: torch.Tensor) -> None:
    seen = []

    def hook(module, inputs, output):
        for axis in (0, 1):
            k, s, p, d = (
                v if isinstance(v, int) else v[axis]
                for v in (module.kernel_size, module.stride, module.padding, module.dilation)
            )
            seen.append(
                (inputs[0].shape[2 + axis], output.shape[2 + axis], formula(inputs[0].shape[2 + axis], k, s, p, d))
            )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    assert seen and all(out == expected for _, out, expected in seen), seen


@given(
    st.one_of(scratch_cnns(), st.just(C.ResNet(arch="resnet18", weights="none"))),
    st.integers(0, 24),
    st.integers(0, 24),
)
def test_every_layer_of_imgcls_models_obeys_the_formula(cfg, extra_h, extra_w):
    """Every convolution and max-pooling layer in imgcls's models (scratch CNN, ResNet18's strided 7x7,
    3x3 and 1x1 convolutions and its padded 3x3 pool) produces floor((H + 2p - k) / s) + 1 pixels."""
    model = built(cfg, 3)
    x = torch.rand(1, 3, cfg.min_image_size + extra_h, cfg.min_image_size + extra_w)
    check_model_layers_obey_formula(conv_out, model, x)


# ------------------------------------------------------------------------------------- claim 3


def window(size: int, centre: int, radius: int) -> torch.Tensor:
    return (torch.arange(size) - centre).abs() <= radius


def check_conv_window(conv: nn.Conv2d, h: int, w: int, i: int, j: int, c: int, seed: int) -> None:
    x = torch.rand(1, conv.in_channels, h, w, dtype=torch.float64, generator=generator(seed), requires_grad=True)
    conv(x)[0, c % conv.out_channels, i % h, j % w].backward()
    support = x.grad[0].abs().sum(0) != 0
    expected = window(h, i % h, 1)[:, None] & window(w, j % w, 1)[None, :]
    assert torch.equal(support, expected), (support.int(), expected.int())


windows = st.tuples(
    st.integers(1, 12), st.integers(1, 12), st.integers(0, 11), st.integers(0, 11), st.integers(0, 7), seeds
)


@given(scratch_cnns(), windows)
def test_output_pixel_sees_exactly_its_3x3_window(cfg, where):
    """ "Kernel size 3 looks at a 3x3 neighbourhood": an output pixel's gradient with respect to the input
    is non-zero exactly inside its 3x3 window (clipped at the border), for every conv layer."""
    for conv in convs(cfg):
        check_conv_window(conv, *where)


def test_window_check_catches_larger_and_dilated_kernels():
    """Broken variants: a 5x5 kernel (padding 2) and a dilated 3x3 (dilation 2, padding 2) also keep the size."""
    falsify(lambda where: check_conv_window(nn.Conv2d(2, 2, 5, padding=2).double(), *where), windows)
    falsify(lambda where: check_conv_window(nn.Conv2d(2, 2, 3, padding=2, dilation=2).double(), *where), windows)


def structural_receptive_field(backbone: nn.Module) -> tuple[int, int, int]:
    """(field, jump, offset) from the layers themselves: r += (k - 1) d j, j *= s, offset += p j."""
    r, j, offset = 1, 1, 0
    for m in backbone:
        if isinstance(m, models.GlobalAvgPool):
            break
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p, d = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            r, offset, j = r + (k - 1) * d * j, offset + p * j, j * s
    return r, j, offset


def linear_twin(backbone: nn.Module) -> nn.Module:
    """Same geometry, no routing: MaxPool sends the gradient to one pixel per window, AvgPool to all four."""
    twin = copy.deepcopy(backbone)
    for name, m in twin.named_children():
        if isinstance(m, nn.MaxPool2d):
            setattr(twin, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
        elif isinstance(m, nn.ReLU):
            setattr(twin, name, nn.Identity())
    return twin


def span(size: int, start: int, length: int) -> torch.Tensor:
    index = torch.arange(size)
    return (index >= start) & (index < start + length)


def check_receptive_field(formula, cfg: C.ScratchCNN, extra: int, i: int, j: int, seed: int) -> None:
    n = len(cfg.channels)
    field = formula(cfg)
    torch.manual_seed(seed)
    backbone = models.build_model(cfg, 2).backbone.double().eval()
    jump, offset = 2**n, 2**n - 1  # each block doubles the spacing; conv padding 1 at spacing 2**i shifts the origin
    assert structural_receptive_field(backbone) == (field, jump, offset)
    size = 2**n + extra
    feats = nn.Sequential(*list(backbone)[:-1])  # up to the last MaxPool: one feature per window
    i, j = i % (size // jump), j % (size // jump)
    expected = span(size, i * jump - offset, field)[:, None] & span(size, j * jump - offset, field)[None, :]
    x = torch.rand(4, 3, size, size, dtype=torch.float64, generator=generator(seed), requires_grad=True)
    feats(x)[:, :, i, j].sum().backward()
    assert not ((x.grad.abs().sum((0, 1)) != 0) & ~expected).any(), "gradient outside the receptive field"
    x.grad = None
    linear_twin(feats)(x)[:, :, i, j].sum().backward()
    assert torch.equal(x.grad.abs().sum((0, 1)) != 0, expected), "the field is smaller than the formula"


fields = st.tuples(
    scratch_cnns(max_blocks=4, max_channels=3), st.integers(0, 20), st.integers(0, 7), st.integers(0, 7), seeds
)


@given(fields)
def test_scratch_cnn_receptive_field_matches_closed_form(args):
    """The scratch CNN's receptive field (before global pooling) matches the closed form 3 * 2**n - 2
    for n conv3x3 + MaxPool(2) blocks: from its layers, from the gradient, and exactly on its linear twin."""
    check_receptive_field(models.receptive_field, *args)


def test_receptive_field_check_catches_off_by_one_formulas():
    """Broken variants: 3 * 2**n - 1 (one pixel too many) and 2**(n+1) + 1 (conv only, pools forgotten)."""
    falsify(
        lambda args: check_receptive_field(lambda cfg: 3 * 2 ** len(cfg.channels) - 1, *args), fields, max_examples=20
    )
    falsify(
        lambda args: check_receptive_field(lambda cfg: 2 ** (len(cfg.channels) + 1) + 1, *args), fields, max_examples=20
    )


# ----------------------------------------------------------------------------------- claim 4 (conv)


def check_translation_equivariance(conv: nn.Module, h: int, w: int, dy: int, dx: int, seed: int) -> None:
    """conv(shift(x)) == shift(conv(x)) on outputs whose window touches neither the border nor the wrap."""
    x = torch.rand(1, conv.in_channels, h, w, dtype=torch.float64, generator=generator(seed))
    shifted_then_conv = conv(torch.roll(x, (dy, dx), (2, 3)))
    conv_then_shifted = torch.roll(conv(x), (dy, dx), (2, 3))
    oh, ow = shifted_then_conv.shape[2:]
    rows = slice(max(1, 1 + dy), min(h - 1, h - 1 + dy, oh))
    cols = slice(max(1, 1 + dx), min(w - 1, w - 1 + dx, ow))
    assert torch.allclose(
        shifted_then_conv[..., rows, cols], conv_then_shifted[..., rows, cols], rtol=1e-12, atol=1e-12
    )


shifts = st.tuples(st.integers(6, 16), st.integers(6, 16), st.integers(-2, 2), st.integers(-2, 2), seeds)


@given(scratch_cnns(), shifts)
def test_convolution_is_translation_equivariant_away_from_borders(cfg, shift):
    """Convolution is translation-equivariant away from the borders: shifting the input shifts the output."""
    for conv in convs(cfg):
        check_translation_equivariance(conv, *shift)


def test_equivariance_check_catches_strided_and_position_dependent_layers():
    """Broken variants: a stride-2 convolution, and a convolution plus a position-dependent bias."""

    class PositionBias(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + torch.arange(x.shape[2], dtype=x.dtype)[:, None]

    falsify(lambda s: check_translation_equivariance(nn.Conv2d(2, 2, 3, stride=2, padding=1).double(), *s), shifts)
    falsify(lambda s: check_translation_equivariance(PositionBias(2, 2, 3, padding=1).double(), *s), shifts)
