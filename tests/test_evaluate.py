"""imgcls.evaluate's loading of a checkpoint for inference: a pickle is refused by predict and
evaluate without running it, and a checkpoint of another architecture or class list is refused
with each difference spelled out."""

from __future__ import annotations

import pytest

from imgcls import evaluate, predict
from imgcls.errors import CheckpointError

from .fixtures import experiment, make_split


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
