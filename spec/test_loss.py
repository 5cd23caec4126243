"""Claims 6 and 7: cross-entropy, logits, label smoothing, softmax, and predict's top class.

imgcls's loss on a split is `evaluate.compute_metrics(...)["loss"]`; training uses
nn.CrossEntropyLoss(label_smoothing=train.label_smoothing) on the raw model output.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from imgcls import config as C
from imgcls import evaluate, predict
from imgcls.evaluate import Trained
from imgcls.runtime import Inputs

from .strategies import logits, scratch_cnns, seeds
from .support import built, falsify


def imgcls_loss(x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluate.compute_metrics(x, y, [f"c{i}" for i in range(x.shape[1])])["loss"]


# ------------------------------------------------------------------------------------- claim 6


def check_ce_is_nll_of_log_softmax(ce, batch) -> None:
    x, y = batch
    assert abs(ce(x, y) - float(F.nll_loss(torch.log_softmax(x, 1), y))) <= 1e-9


@given(logits())
def test_cross_entropy_is_nll_of_log_softmax(batch):
    """CrossEntropyLoss includes log_softmax: CE(logits, y) == NLLLoss(log_softmax(logits), y), for imgcls's
    evaluation loss."""
    check_ce_is_nll_of_log_softmax(imgcls_loss, batch)


def test_ce_check_catches_nll_on_raw_logits():
    """Broken variant: NLLLoss applied to the logits themselves (forgetting log_softmax)."""
    falsify(lambda b: check_ce_is_nll_of_log_softmax(lambda x, y: float(F.nll_loss(x, y)), b), logits())


shifted = st.tuples(logits(), st.floats(-100, 100))


def check_shift_invariance(ce, case) -> None:
    (x, y), c = case
    assert abs(ce(x + c, y) - ce(x, y)) <= 1e-9


@given(shifted)
def test_cross_entropy_is_invariant_to_a_constant_added_to_all_logits(case):
    """CE is invariant to adding a constant to all logits."""
    check_shift_invariance(imgcls_loss, case)


def test_shift_check_catches_losses_without_normalisation():
    """Broken variants: NLL on raw logits, and a sigmoid per class (BCE) instead of a softmax over classes."""
    falsify(lambda case: check_shift_invariance(lambda x, y: float(F.nll_loss(x, y)), case), shifted)
    bce = lambda x, y: float(F.binary_cross_entropy_with_logits(x, F.one_hot(y, x.shape[1]).to(x.dtype)))
    falsify(lambda case: check_shift_invariance(bce, case), shifted)


def check_outputs_logits(build, cfg, k: int, seed: int) -> None:
    """No (log-)softmax anywhere, a Linear layer last, and outputs that are not probabilities."""
    model = build(cfg, k, seed).eval()
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)) for m in model.modules())
    assert isinstance(list(model.head.modules())[-1], nn.Linear)
    with torch.no_grad():
        out = model(torch.rand(4, 3, cfg.min_image_size, cfg.min_image_size) * 4 - 2)
    assert not (torch.allclose(out.sum(1), torch.ones(4)) or torch.allclose(out.exp().sum(1), torch.ones(4)))


models_under_test = st.tuples(
    st.one_of(scratch_cnns(), st.just(C.ResNet(arch="resnet18", weights="none"))), st.integers(2, 5), seeds
)


@settings(max_examples=10)
@given(models_under_test)
def test_imgcls_models_output_logits(args):
    """imgcls models output logits: no softmax layer, so CrossEntropyLoss does not apply softmax twice."""
    check_outputs_logits(built, *args)


def test_logits_check_catches_a_softmax_head():
    """Broken variants: a head ending in Softmax, and one ending in LogSoftmax."""
    for last in (nn.Softmax(1), nn.LogSoftmax(1)):

        def with_softmax(cfg, k, seed, last=last):
            model = copy.deepcopy(built(cfg, k, seed))
            model.head = nn.Sequential(model.head, last)
            return model

        falsify(lambda args: check_outputs_logits(with_softmax, *args), models_under_test, max_examples=5)


smoothed = st.tuples(logits(), st.floats(0, 0.99))


def check_label_smoothing(target_mixture, case) -> None:
    """The smoothed loss equals the cross-entropy against the documented mixture of targets."""
    (x, y), s = case
    q = target_mixture(y, x.shape[1], s)
    expected = float(-(q * torch.log_softmax(x, 1)).sum(1).mean())
    assert abs(float(nn.CrossEntropyLoss(label_smoothing=s)(x, y)) - expected) <= 1e-9


def documented_mixture(y: torch.Tensor, k: int, s: float) -> torch.Tensor:
    """PyTorch's documentation: (1 - s) * one_hot(y) + s / K, with K the number of classes."""
    return (1 - s) * F.one_hot(y, k).double() + s / k


@given(smoothed)
def test_label_smoothing_gives_the_documented_mixture_of_targets(case):
    """Label smoothing s gives the documented mixture of targets: (1 - s) * one_hot(y) + s / K."""
    check_label_smoothing(documented_mixture, case)


def test_smoothing_check_catches_the_other_convention():
    """Broken variant: spreading s over the K - 1 wrong classes only (another paper's convention)."""

    def other(y, k, s):
        return (1 - s) * F.one_hot(y, k).double() + s / (k - 1) * (1 - F.one_hot(y, k).double())

    falsify(lambda case: check_label_smoothing(other, case), smoothed)


# ------------------------------------------------------------------------------------- claim 7


def check_softmax(case) -> None:
    x, _ = case
    p = torch.softmax(x.float(), 1)
    assert (p > 0).all()
    assert torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-6)


@given(logits(bound=40.0))
def test_softmax_is_positive_and_sums_to_one(case):
    """Softmax probabilities are positive and sum to 1 (float32, logits within +-40 of each other's range;
    beyond a spread of about 104, exp underflows to an exact 0 in float32, see the next test)."""
    check_softmax(case)


def test_softmax_check_catches_float32_underflow():
    """The bound above is real: a float32 logit spread of 200 gives a probability of exactly 0."""
    falsify(check_softmax, logits(bound=100.0))


def write_index_images(folder: Path, count: int) -> list[str]:
    """Image i is a flat PNG of grey level i: the stub model below reads the index back from a pixel."""
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class TableModel(nn.Module):
    """Returns row i of a fixed logits table for the image whose pixels are i."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].round().long()]


def check_predict_top_class(classify, folder: Path, table: torch.Tensor, batch: int, top_k: int) -> None:
    exp = C.validate(
        {
            "name": "p",
            "data": {"train_dir": "t", "val_dir": "v", "image_size": 8, "eval_batch_size": batch},
            "model": {"arch": "scratch_cnn"},
        }
    )
    classes = [f"class{i}" for i in range(table.shape[1])]
    loaded = Trained(exp, TableModel(table), classes, Inputs(lambda images: images.float(), torch.device("cpu"), "fp32"))
    paths = write_index_images(folder, len(table))
    results, errors = classify(loaded, paths, top_k)
    assert not errors and [r["path"] for r in results] == paths
    probs = torch.softmax(table, 1)
    for row, result in zip(range(len(table)), results):
        top = result["top"]
        assert len(top) == min(top_k, table.shape[1])
        best = classes.index(top[0]["class"])
        assert table[row, best] == table[row].max()  # ties: any maximal class is an argmax
        assert abs(top[0]["probability"] - float(probs[row].max())) <= 1e-6
        assert all(a["probability"] >= b["probability"] for a, b in itertools.pairwise(top))


prediction_cases = st.tuples(logits(max_n=7, max_classes=5, bound=10.0), st.integers(1, 4), st.integers(1, 3))


@settings(max_examples=10)
@given(case=prediction_cases)
# Found by hypothesis: both logits give probability 0.5 in float32, and ranking by probability picked class 0.
@example(case=((torch.tensor([[-4.1898e-11, 0.0]], dtype=torch.float64), torch.tensor([0])), 1, 1))
def test_predict_top_class_is_argmax_of_logits(tmp_path_factory, case):
    """predict's top class equals the argmax of the logits (for any eval batch size and top-k)."""
    (table, _), batch, top_k = case
    check_predict_top_class(predict.classify, tmp_path_factory.mktemp("predict"), table.float(), batch, top_k)


def test_predict_check_catches_shifted_class_names_and_wrong_batching(tmp_path_factory):
    """Broken variants: class names off by one, and a batch order scrambled before flushing."""

    def off_by_one(loaded, paths, top_k):
        loaded.classes = loaded.classes[1:] + loaded.classes[:1]
        return predict.classify(loaded, paths, top_k)

    def reversed_results(loaded, paths, top_k):
        results, errors = predict.classify(loaded, paths, top_k)
        tops = [r["top"] for r in results][::-1]
        return [{"path": r["path"], "top": t} for r, t in zip(results, tops)], errors

    for broken in (off_by_one, reversed_results):
        falsify(
            lambda c, broken=broken: check_predict_top_class(
                broken, tmp_path_factory.mktemp("p"), c[0][0].float(), *c[1:]
            ),
            prediction_cases,
            max_examples=50,
        )
