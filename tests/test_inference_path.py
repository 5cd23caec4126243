"""Inference answers with one numeric path, and the checkpoint decides its preprocessing."""

from __future__ import annotations

import os

import pytest
import torch

from imgcls import evaluate, predict
from imgcls.errors import CheckpointError

from .tiny_data import experiment, train_tiny


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def trained_run(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"inference_{request.param}")
    exp = train_tiny(base, {"train": {"precision": request.param, "epochs": 1}, "data": {"eval_batch_size": 3}})
    return base, exp, request.param


def test_predict_and_evaluate_give_the_same_logits(trained_run, monkeypatch):
    """Validation, evaluate and predict share evaluate.forward: the same bits for the same image,
    under bf16 autocast as under fp32."""
    base, exp, _ = trained_run
    monkeypatch.chdir(base)
    trained = evaluate.load_for_inference(str(exp), "runs/tiny/best.safetensors")
    paths, logits, _ = evaluate.split_logits(trained, "val")
    results, errors = predict.classify(trained, paths, top_k=len(trained.classes))
    assert not errors and [r["path"] for r in results] == paths
    expected = logits.softmax(1)
    for row, result in zip(expected, results):
        got = {t["class"]: t["probability"] for t in result["top"]}
        assert got == {c: float(row[i]) for i, c in enumerate(trained.classes)}


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"data": {"image_size": 12}}, "data.image_size"),
        ({"data": {"normalize": "half"}}, "data.normalize"),
        ({"data": {"resize_size": 20}}, "data.resize_size"),
        ({"train": {"precision": "other"}}, "train.precision"),
        ({"model": {"hidden": 8}}, "model.hidden"),
    ],
)
def test_an_experiment_that_preprocesses_differently_is_refused(trained_run, overrides, key):
    """A 16-px checkpoint pointed at another image_size (or normalisation, ...) would silently
    give other numbers: it is refused, naming the key."""
    base, _, precision = trained_run
    if overrides.get("train", {}).get("precision") == "other":
        precision = {"fp32": "bf16", "bf16": "fp32"}[precision]
    other = experiment(base, overrides | {"train": {"epochs": 1, "precision": precision}}, "other.toml")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        with pytest.raises(CheckpointError, match=rf"change predictions:\n  - {key}: "):
            evaluate.load_for_inference(str(other), "runs/tiny/best.safetensors")
    finally:
        os.chdir(cwd)


def test_keys_that_do_not_change_predictions_may_differ(trained_run, monkeypatch):
    base, _, precision = trained_run
    monkeypatch.chdir(base)
    other = experiment(base, {"train": {"epochs": 7, "precision": precision}, "data": {"eval_batch_size": 5}, "seed": 11}, "neutral.toml")
    trained = evaluate.load_for_inference(str(other), "runs/tiny/best.safetensors")
    _, logits, labels = evaluate.split_logits(trained, "val")
    assert len(logits) == len(labels) == 8 and torch.isfinite(logits).all()
