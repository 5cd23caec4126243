"""imgcls.evaluate's loading of a checkpoint for inference: a pickle is refused by predict and
evaluate without running it, and a checkpoint of another architecture or class list is refused
with each difference spelled out; predict answers with evaluate's logits, and the checkpoint
decides the preprocessing."""

from __future__ import annotations

import os

import pytest
import torch

from imgcls import evaluate, predict
from imgcls.errors import CheckpointError

from .fixtures import experiment, make_split, train_tiny


# ------------------------------------------------------------------------------ case 12: pickles


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_predict_and_evaluate_refuse_pickled_checkpoints_without_running_them(
    trained, hostile, monkeypatch, capsys, force_unsafe
):
    base, exp_path, run_dir = trained
    files, marker = hostile
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(base)
    image = str(base / "data" / "val" / "cat" / "0.png")
    for path in files.values():
        assert predict.main([str(exp_path), str(path), image]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err, err
        assert evaluate.main([str(exp_path), str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err, err
        assert not marker.exists(), f"{path.name}: the payload ran"


# ---------------------------------------------------------------- case 14: the wrong checkpoint


def test_a_checkpoint_of_another_architecture_is_refused_with_the_difference(trained, monkeypatch):
    base, _, run_dir = trained
    monkeypatch.chdir(base)
    wider = experiment(base, {"model": {"channels": [8, 32], "dropout": 0.5}}, "wider.toml")
    with pytest.raises(CheckpointError) as info:
        evaluate.load_for_inference(str(wider), str(run_dir / "best.safetensors"))
    message = str(info.value)
    assert "model.channels: [8, 16] (checkpoint) vs [8, 32] (experiment)" in message, message
    assert "model.dropout: 0.3 (checkpoint) vs 0.5 (experiment)" in message
    assert "model.hidden" not in message  # only what differs

    resnet = experiment(base, {"model": {"arch": "resnet18", "weights": "none", "channels": None, "hidden": None,
                                         "dropout": None, "batch_norm": None}, "data": {"image_size": 32}}, "resnet.toml")
    with pytest.raises(CheckpointError, match=r'model.arch: "scratch_cnn" \(checkpoint\) vs "resnet18" \(experiment\)'):
        evaluate.load_for_inference(str(resnet), str(run_dir / "best.safetensors"))


def test_a_checkpoint_of_another_class_list_is_refused_with_the_difference(trained, monkeypatch, capsys):
    base, _, run_dir = trained
    make_split(base / "other" / "train", 1, classes=("cat", "eel", "fox"))
    monkeypatch.chdir(base)
    other = experiment(base, {"data": {"train_dir": "other/train"}}, "other.toml")
    with pytest.raises(CheckpointError) as info:
        evaluate.load_for_inference(str(other), str(run_dir / "best.safetensors"))
    message = str(info.value)
    assert "knows classes ['cat', 'dog']" in message and "has ['cat', 'eel', 'fox']" in message
    assert "missing from the checkpoint ['eel', 'fox'], extra in it ['dog']" in message
    assert predict.main([str(other), str(run_dir / "best.safetensors"), str(base / "data" / "val")]) == 2
    assert "missing from the checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------- one numeric path, one truth


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
