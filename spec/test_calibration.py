"""Claim 19: expected calibration error and temperature scaling.

imgcls's ECE is `calibration.ece` (15 equal-width bins), reported per split in metrics.json; its
temperature is `calibration.fit_temperature`, applied by predict through `Calibration.probabilities`.
"""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imgcls import calibration, predict
from imgcls import config as C
from imgcls.evaluate import Trained
from imgcls.runtime import Inputs

from .support import falsify
from .test_loss import TableModel, write_index_images


def brute_force_ece(probs: list[list[float]], labels: list[int], bins: int = 15) -> float:
    """The textbook definition, one bin (lo, hi] at a time: sum |B|/n * |accuracy(B) - confidence(B)|."""
    confidence = [max(row) for row in probs]
    correct = [row.index(max(row)) == y for row, y in zip(probs, labels)]  # the first maximal class, as argmax
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        members = [j for j, c in enumerate(confidence) if lo < c <= hi or (i == 0 and c == 0)]
        if members:
            accuracy = sum(correct[j] for j in members) / len(members)
            mean_confidence = sum(confidence[j] for j in members) / len(members)
            total += len(members) / len(probs) * abs(accuracy - mean_confidence)
    return total


@st.composite
def probabilities(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities float64 (N, K), labels (N,)): rows of positive weights normalised to sum 1."""
    n, k = draw(st.integers(1, 40)), draw(st.integers(2, 6))
    weights = draw(st.lists(st.floats(1e-3, 1.0), min_size=n * k, max_size=n * k))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    w = torch.tensor(weights, dtype=torch.float64).view(n, k)
    return w / w.sum(1, keepdim=True), torch.tensor(labels)


def check_ece(ece, case) -> None:
    probs, labels = case
    assert abs(ece(probs, labels) - brute_force_ece(probs.tolist(), labels.tolist())) <= 1e-12


# 0.8 is the edge 12/15, which closes bin 11: there it shares a bin with 0.79 (ECE 0.295); a bin
# [lo, hi) would separate them (ECE 0.495).
EDGE_CASE = (torch.tensor([[0.2, 0.8], [0.79, 0.21]], dtype=torch.float64), torch.tensor([1, 1]))


@given(probabilities())
@example(EDGE_CASE)
def test_ece_is_the_binned_definition(case):
    """ECE = sum over 15 equal-width bins (i/15, (i+1)/15] of |B|/n * |acc(B) - conf(B)|, as a brute-force
    loop over bins computes it."""
    check_ece(calibration.ece, case)


def test_ece_check_catches_unweighted_bins_and_ten_bins():
    """Broken variants: bins averaged without their |B|/n weights, and 10 bins instead of 15."""

    def unweighted(probs, labels):
        counts, confidences, correct = calibration.reliability(probs, labels)
        filled = counts > 0
        return float(((correct - confidences)[filled] / counts[filled]).abs().mean())

    def ten_bins(probs, labels):
        return brute_force_ece(probs.tolist(), labels.tolist(), bins=10)

    for broken in (unweighted, ten_bins):
        falsify(lambda case, broken=broken: check_ece(broken, case), probabilities())


def test_ece_of_a_perfectly_calibrated_case_is_zero_and_of_a_simple_case_known():
    """Where each bin's accuracy equals its confidence, ECE = 0: four images at 0.75 with three right,
    five at 0.6 with three right. Two images, 0.9 right and 0.6 wrong: ECE = (0.1 + 0.6) / 2 = 0.35."""
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[0.6, 0.4]] * 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1] + [0, 0, 0, 1, 1])
    assert calibration.ece(probs, labels) <= 1e-12
    labels[3] = 0  # four right at 0.75: that bin is under-confident by 0.25, weighted 4/9
    assert math.isclose(calibration.ece(probs, labels), 4 / 9 * 0.25, rel_tol=1e-12)
    simple = torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    assert math.isclose(calibration.ece(simple, torch.tensor([0, 1])), 0.35, rel_tol=1e-12)


def calibrated_sample(seed: int, n: int = 20_000, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from the softmax of those logits: a calibrated model by construction."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return z, torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)


def test_a_sampled_calibrated_model_has_small_ece_and_an_overconfident_one_large():
    z, y = calibrated_sample(0, n=50_000)
    assert calibration.ece(z.softmax(1), y) < 0.01
    assert calibration.ece((3 * z).softmax(1), y) > 0.1


def check_temperature_recovered(fit, case) -> None:
    t0, seed = case
    z, y = calibrated_sample(seed)
    assert math.isclose(fit(z * t0, y), t0, rel_tol=0.05)


temperatures = st.tuples(st.floats(0.2, 5.0), st.integers(0, 2**16))


@settings(max_examples=20)
@given(temperatures)
def test_temperature_scaling_recovers_a_known_temperature(case):
    """Logits of a calibrated model multiplied by T0 (over-confident for T0 > 1): the temperature that
    minimises NLL(logits / T) is T0, within 5% at 20,000 images."""
    check_temperature_recovered(calibration.fit_temperature, case)


def test_temperature_check_catches_an_inverted_temperature_and_a_narrow_search():
    """Broken variants: 1/T returned, and a search bracket that stops at T = 2."""

    def clipped(z, y):
        return min(calibration.fit_temperature(z, y), 2.0)

    for broken in (lambda z, y: 1 / calibration.fit_temperature(z, y), clipped):
        falsify(lambda case, broken=broken: check_temperature_recovered(broken, case), temperatures, max_examples=30)


def test_the_fitted_temperature_is_deterministic():
    z, y = calibrated_sample(1, n=2_000)
    assert calibration.fit_temperature(z * 2, y) == calibration.fit_temperature(z.clone() * 2, y)


# ----------------------------------------------- temperature scaling never changes the predicted class


def with_temperature(temperature: float):
    """predict.classify with a calibration of that temperature attached to the model."""

    def classify(loaded, paths, top_k):
        loaded.calibration = calibration.Calibration(temperature, "best.safetensors", "0" * 64, "none", 1, 0, 0, 0, 0)
        return predict.classify(loaded, paths, top_k)

    return classify


def check_calibrated_prediction(classify, folder, table: torch.Tensor, temperature: float, top_k: int) -> None:
    """predict's top class is the argmax of the logits, and its probabilities are softmax(logits / T)."""
    exp = C.validate({"name": "p", "data": {"train_dir": "t", "val_dir": "v", "image_size": 8, "eval_batch_size": 3},
                      "model": {"arch": "scratch_cnn"}})
    classes = [f"class{i}" for i in range(table.shape[1])]
    loaded = Trained(exp, TableModel(table), classes, Inputs(lambda images: images.float(), torch.device("cpu"), "fp32"))
    results, errors = classify(loaded, write_index_images(folder, len(table)), top_k)
    assert not errors
    expected = (table / temperature).softmax(1)
    for row, result in enumerate(results):
        top = result["top"]
        best = classes.index(top[0]["class"])
        assert table[row, best] == table[row].max()
        for guess in top:
            assert abs(guess["probability"] - float(expected[row, classes.index(guess["class"])])) <= 1e-6
        assert result["temperature"] == temperature


calibrated_cases = st.tuples(
    st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=6),
    st.floats(0.01, 100.0),
    st.integers(1, 3),
)


@settings(max_examples=10)
@given(case=calibrated_cases)
# Logits 1e-6 apart divided by T = 100 have equal float32 probabilities: ranked by probability, class 0 would win.
@example(case=([[0.0, 1e-6, -1.0]], 100.0, 1))
def test_temperature_scaling_never_changes_the_predicted_class(tmp_path_factory, case):
    """softmax(z / T) for T > 0 keeps the order of z: with a calibration, predict's top class is still the
    argmax of the logits, and its probabilities are softmax(z / T)."""
    rows, temperature, top_k = case
    table = torch.tensor(rows, dtype=torch.float32)
    check_calibrated_prediction(with_temperature(temperature), tmp_path_factory.mktemp("cal"), table, temperature, top_k)


def test_calibrated_prediction_check_catches_a_multiplied_temperature(tmp_path_factory):
    """Broken variant: the logits multiplied by T instead of divided (the check still expects division)."""

    def check(case):
        rows, temperature, top_k = case
        table = torch.tensor(rows, dtype=torch.float32)

        def multiplied(loaded, paths, top_k):
            results, errors = with_temperature(1 / temperature)(loaded, paths, top_k)
            return [r | {"temperature": temperature} for r in results], errors

        check_calibrated_prediction(multiplied, tmp_path_factory.mktemp("c"), table, temperature, top_k)

    falsify(check, calibrated_cases, max_examples=30)
