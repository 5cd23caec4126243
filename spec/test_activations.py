"""Claims 8 and 9: ReLU and Dropout, as the scratch CNN uses them.

The modules are taken from `models.build_model`: the scratch CNN's ReLUs are in-place, so every
check feeds them a copy.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from imgcls import config as C
from imgcls import models

from .strategies import generator, scratch_cnns, seeds
from .support import falsify

CFG = C.ScratchCNN(arch="scratch_cnn", channels=[2], hidden=4, dropout=0.5)


def scratch_modules(kind: type, cfg: C.ScratchCNN = CFG) -> list[nn.Module]:
    found = [m for m in models.build_model(cfg, 2).modules() if isinstance(m, kind)]
    assert found
    return found


def apply(f, x: torch.Tensor) -> torch.Tensor:
    return f(x.clone())  # in-place modules must not change the caller's tensor


values = arrays(np.float32, st.integers(1, 32), elements=st.floats(-1e6, 1e6, width=32)).map(torch.from_numpy)
# Multiples of 1/8: sums are exact, so x + y == x only when y == 0 (no rounding away of a tiny y).
eighths = st.integers(-8000, 8000).map(lambda i: i / 8)
pairs = st.integers(1, 16).flatmap(
    lambda n: st.tuples(*[arrays(np.float32, n, elements=eighths).map(torch.from_numpy)] * 2)
)

# ------------------------------------------------------------------------------------- claim 8


def check_relu_non_negative_and_idempotent(relu, x: torch.Tensor) -> None:
    once = apply(relu, x)
    assert (once >= 0).all()
    assert torch.equal(apply(relu, once), once)


@given(values)
def test_relu_is_non_negative_and_idempotent(x):
    """ReLU is non-negative and idempotent: relu(x) >= 0 and relu(relu(x)) == relu(x)."""
    for relu in scratch_modules(nn.ReLU):
        check_relu_non_negative_and_idempotent(relu, x)


def test_relu_check_catches_leaky_and_shifted_activations():
    """Broken variants: LeakyReLU (negative outputs) and softplus (positive, but not idempotent)."""
    falsify(lambda x: check_relu_non_negative_and_idempotent(nn.LeakyReLU(0.1), x), values)
    falsify(lambda x: check_relu_non_negative_and_idempotent(nn.Softplus(), x), values)


def check_not_additive(relu, xy) -> None:
    """relu(x + y) == relu(x) + relu(y) exactly where x and y never have opposite signs, and fails elsewhere."""
    x, y = xy
    additive = apply(relu, x + y) == apply(relu, x) + apply(relu, y)
    opposite = ((x > 0) & (y < 0)) | ((x < 0) & (y > 0))
    assert torch.equal(additive, ~opposite)


@given(pairs)
def test_relu_is_not_additive(xy):
    """ReLU is not additive: relu(x + y) == relu(x) + relu(y) holds exactly when x and y do not have
    opposite signs, and fails for every pair that does."""
    for relu in scratch_modules(nn.ReLU):
        check_not_additive(relu, xy)


def test_additivity_check_catches_linear_activations():
    """Broken variant: the identity (an activation that is additive, so the network would be linear)."""
    falsify(lambda xy: check_not_additive(nn.Identity(), xy), pairs)


def check_relu_gradient(relu, x: torch.Tensor) -> None:
    leaf = x.clone().requires_grad_(True)
    relu(leaf * 1).sum().backward()  # `* 1`: in-place ReLU may not overwrite a leaf
    assert torch.equal(leaf.grad[x > 0], torch.ones_like(x[x > 0]))
    assert torch.equal(leaf.grad[x < 0], torch.zeros_like(x[x < 0]))


@given(values)
def test_relu_passes_gradient_one_where_positive(x):
    """ReLU passes gradient 1 where x > 0 (and 0 where x < 0)."""
    for relu in scratch_modules(nn.ReLU):
        check_relu_gradient(relu, x)


def test_gradient_check_catches_smooth_activations():
    """Broken variants: GELU and LeakyReLU pass other gradients."""
    falsify(lambda x: check_relu_gradient(nn.GELU(), x), values)
    falsify(lambda x: check_relu_gradient(nn.LeakyReLU(0.1), x), values)


# ------------------------------------------------------------------------------------- claim 9

dropouts = st.tuples(scratch_cnns(), st.integers(1, 64), seeds)


def check_dropout_eval_identity(dropout: nn.Module, n: int, seed: int) -> None:
    x = torch.randn(n, generator=generator(seed))
    dropout.eval()
    assert torch.equal(dropout(x), x)


def check_dropout_train_scaling(dropout: nn.Module, p: float, n: int, seed: int) -> None:
    x = torch.randn(n, generator=generator(seed)) + 3  # nonzero, so a zero output can only mean "dropped"
    dropout.train()
    torch.manual_seed(seed)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)


@given(dropouts)
def test_dropout_is_identity_in_eval_mode(args):
    """Dropout is the identity in eval mode (and so is the scratch CNN's head: two eval passes agree)."""
    cfg, n, seed = args
    for dropout in scratch_modules(nn.Dropout, cfg):
        check_dropout_eval_identity(dropout, n, seed)
    model = models.build_model(cfg, 3).eval()
    x = torch.rand(2, 3, cfg.min_image_size, cfg.min_image_size, generator=generator(seed))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@given(dropouts)
def test_dropout_zeroes_and_rescales_in_train_mode(args):
    """In train mode Dropout zeroes elements and multiplies the others by 1 / (1 - p), p being model.dropout."""
    cfg, n, seed = args
    for dropout in scratch_modules(nn.Dropout, cfg):
        assert dropout.p == cfg.dropout
        check_dropout_train_scaling(dropout, cfg.dropout, n, seed)


def test_dropout_checks_catch_unscaled_and_always_on_dropout():
    """Broken variants: a mask without the 1 / (1 - p) rescale, and dropout that stays on in eval mode."""

    class Unscaled(nn.Dropout):
        def forward(self, x):
            return x * (torch.rand_like(x) >= self.p) if self.training else x

    class AlwaysOn(nn.Dropout):
        def forward(self, x):
            return nn.functional.dropout(x, self.p, training=True)

    unscaled_p = st.tuples(st.floats(0.05, 0.9), st.integers(1, 64), seeds)
    falsify(lambda a: check_dropout_train_scaling(Unscaled(a[0]), a[0], a[1], a[2]), unscaled_p)
    falsify(lambda a: check_dropout_eval_identity(AlwaysOn(a[0]), a[1], a[2]), unscaled_p)
