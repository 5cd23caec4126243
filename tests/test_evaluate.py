"""imgcls.evaluate's loading of a checkpoint for inference: a pickle is refused by predict and
evaluate without running it, and a checkpoint of another architecture or class list is refused
with each difference spelled out; predict answers with evaluate's logits, and the checkpoint
decides the preprocessing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import pytest
import torch

from imgcls import calibrate, checkpoint, config, data, evaluate, predict
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


# ---------------------------------------------------------------------- test-time augmentation


def val_batch(trained: evaluate.Trained) -> torch.Tensor:
    """The val images as evaluation feeds them: decoded, centre-cropped uint8 (N, C, H, W)."""
    images = data.scan_split("val", trained.exp.data.val_dir, trained.classes)
    decoded, _ = data.decode_split(images, trained.exp.data, progress=False)
    return torch.cat([x for x, _ in data.split_loader(trained.exp, images, decoded)])


def test_flip_tta_is_the_mean_of_the_logits_of_the_image_and_its_mirror(trained_run, monkeypatch):
    """Averaged logits, not probabilities, of the crop and its horizontal mirror, bit for bit as two
    plain passes give them, under bf16 autocast as under fp32."""
    base, exp, _ = trained_run
    monkeypatch.chdir(base)
    trained = evaluate.load_for_inference(str(exp), "runs/tiny/best.safetensors")
    x = val_batch(trained)
    plain = evaluate.forward(trained.model, x, trained.inputs)
    mirrored = evaluate.forward(trained.model, torch.flip(x, dims=[3]), trained.inputs)
    flipped = evaluate.forward(trained.model, x, trained.inputs, "flip")
    assert torch.equal(flipped, (plain + mirrored) / 2)
    assert not torch.equal(flipped, plain)  # the mirror changes this model's answer: the check is not vacuous


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_predict_and_evaluate_give_the_same_logits_with_tta(trained_run, monkeypatch, tta):
    """evaluate --tta and predict --tta answer through one forward pass: equal probabilities, and the
    experiment's evaluate.tta is what both use without the flag."""
    base, _, precision = trained_run
    monkeypatch.chdir(base)
    exp = experiment(base, {"train": {"precision": precision, "epochs": 1}, "data": {"eval_batch_size": 3},
                            "evaluate": {"tta": tta}}, "tta.toml")
    trained = evaluate.load_for_inference(str(exp), "runs/tiny/best.safetensors")
    assert trained.tta == tta
    paths, logits, _ = evaluate.split_logits(trained, "val")
    results, errors = predict.classify(trained, paths, top_k=len(trained.classes))
    assert not errors and all(r["tta"] == tta and r["temperature"] is None for r in results)
    for row, result in zip(logits.softmax(1), results):
        assert {t["class"]: t["probability"] for t in result["top"]} == {c: float(row[i]) for i, c in enumerate(trained.classes)}
    other = {"none": "flip", "flip": "none"}[tta]
    overridden = evaluate.load_for_inference(str(exp), "runs/tiny/best.safetensors", other)
    assert overridden.tta == other
    assert not torch.equal(evaluate.split_logits(overridden, "val")[1], logits)


def test_the_tta_used_is_in_every_output(trained_run, monkeypatch, capsys):
    base, exp, _ = trained_run
    monkeypatch.chdir(base)
    ckpt, image = "runs/tiny/best.safetensors", str(base / "data" / "val" / "cat" / "0.png")
    for tta in ("none", "flip"):
        assert evaluate.main([str(exp), ckpt, "--tta", tta, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tta"] == tta
        assert evaluate.main([str(exp), ckpt, "--tta", tta]) == 0
        assert f"tta {tta}" in capsys.readouterr().out
        assert predict.main([str(exp), ckpt, image, "--tta", tta, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["tta"] == tta
        assert predict.main([str(exp), ckpt, image, "--tta", tta, "--csv"]) == 0
        (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
        assert row["tta"] == tta and row["temperature"] == ""
        assert predict.main([str(exp), ckpt, image, "--tta", tta]) == 0
        assert capsys.readouterr().out.endswith(f"[tta {tta}, uncalibrated]\n")


# --------------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("calibration")
    exp = train_tiny(base, {"train": {"epochs": 2}})
    return base, exp, base / "runs" / "tiny"


def predicted(argv: list[str], capsys, warning: str | None = None) -> list[dict]:
    assert predict.main([*argv, "--json", "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    if warning:
        assert warning in err, err
    else:
        assert "warning" not in err, err
    return json.loads(out)


def test_calibrate_writes_its_file_and_predict_then_reports_calibrated_probabilities(calibrated_run, monkeypatch, capsys):
    """The temperature fitted on val lowers (or keeps) the val NLL, changes predict's probabilities and
    never its top class; predict, evaluate and the text output say T."""
    base, exp, run_dir = calibrated_run
    monkeypatch.chdir(base)
    argv = [str(exp), str(run_dir / "best.safetensors"), "data/val"]
    before = predicted(argv, capsys)
    assert calibrate.main([str(run_dir)]) == 0
    assert "calibrated: T=" in capsys.readouterr().out
    saved = json.loads((run_dir / "calibration.json").read_text())
    t = saved["temperature"]
    assert saved["checkpoint"] == "best.safetensors" and saved["tta"] == "none" and saved["images"] == 8
    assert saved["checkpoint_sha256"] == hashlib.sha256((run_dir / "best.safetensors").read_bytes()).hexdigest()
    assert saved["nll_after"] <= saved["nll_before"] and abs(t - 1) > 1e-3

    after = predicted(argv, capsys)
    assert [r["top"][0]["class"] for r in after] == [r["top"][0]["class"] for r in before]
    assert all(r["temperature"] == t and b["temperature"] is None for r, b in zip(after, before))
    trained = evaluate.load_for_inference(str(exp), str(run_dir / "best.safetensors"))
    _, logits, _ = evaluate.split_logits(trained, "val")
    for r, b, row in zip(after, before, logits):
        assert r["top"][0]["probability"] != b["top"][0]["probability"]
        assert r["top"][0]["probability"] == pytest.approx(float((row / t).softmax(0).max()), abs=1e-6)
    assert predict.main(argv[:2] + ["data/val/cat/0.png"]) == 0
    assert f"calibrated: T={t:.4f}]" in capsys.readouterr().out
    assert evaluate.main(argv[:2]) == 0
    out = capsys.readouterr().out
    assert f"calibrated: T={t:.4f}  ECE {saved['ece_before']:.4f} -> {saved['ece_after']:.4f}" in out


def test_a_calibration_of_other_weights_or_another_tta_is_ignored_with_a_warning(calibrated_run, monkeypatch, capsys):
    """calibration.json names the checkpoint file's SHA-256 and the TTA it was fitted with: for another
    file (last beside best, or best retrained or replaced) or another TTA it is ignored, saying so on
    stderr, and the probabilities are the uncalibrated ones; the command still succeeds."""
    base, exp, run_dir = calibrated_run
    monkeypatch.chdir(base)
    assert calibrate.main([str(run_dir)]) == 0
    capsys.readouterr()
    for ckpt, flags, why in (
        ("last.safetensors", [], "fitted for other weights (best.safetensors"),  # two epochs: last is not best
        ("best.safetensors", ["--tta", "flip"], "fitted with tta = 'none', predicting with 'flip'"),
    ):
        results = predicted([str(exp), str(run_dir / ckpt), "data/val", *flags], capsys, warning=why)
        assert all(r["temperature"] is None for r in results)
    good = json.loads((run_dir / "calibration.json").read_text())
    (run_dir / "calibration.json").write_text(json.dumps(good | {"checkpoint_sha256": "0" * 64}))
    assert evaluate.main([str(exp), str(run_dir / "best.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "ignored: it was fitted for other weights" in err and "calibrated:" not in out


def test_a_run_evaluates_val_with_its_tta_and_reports_ece_and_reliability(tmp_path, monkeypatch):
    """evaluate.tta = "flip": the run's final val metrics are evaluate --tta flip's, metrics.json says
    which TTA and holds the ECE of those logits, and the reliability diagram is in the folder."""
    exp = train_tiny(tmp_path, {"train": {"epochs": 1}, "evaluate": {"tta": "flip"}})
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tta"] == "flip"
    flipped = evaluate.evaluate_checkpoint(str(exp), str(run_dir / "best.safetensors"), "val")
    plain = evaluate.evaluate_checkpoint(str(exp), str(run_dir / "best.safetensors"), "val", tta="none")
    assert flipped["tta"] == "flip" and plain["tta"] == "none"
    assert metrics["val"]["loss"] == flipped["loss"] != plain["loss"]
    assert metrics["val"]["ece"] == flipped["ece"] and 0 <= flipped["ece"] <= 1
    assert (run_dir / "reliability_val.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(torch.cuda.is_available(), reason="device \"auto\" would pick the GPU")
def test_a_checkpoint_trained_in_fp16_answers_in_fp32_on_the_cpu(tmp_path, monkeypatch, capsys):
    """fp16 autocast exists on CUDA only, but the weights it trains are float32: a run trained in fp16
    on a GPU (device "auto") is evaluated on a CPU-only machine in fp32, saying so, not refused."""
    train_tiny(tmp_path, {"train": {"epochs": 1}})
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "runs" / "tiny" / "best.safetensors"
    saved = checkpoint.load(ckpt)
    on_gpu = config.loads(saved.meta["experiment"], "stored")
    on_gpu = on_gpu.model_copy(update={"device": "cuda", "train": on_gpu.train.model_copy(update={"precision": "fp16"})})
    saved.meta["experiment"] = config.to_toml(on_gpu)
    checkpoint.save(ckpt, saved)
    exp_path = experiment(tmp_path, {"device": "auto", "train": {"epochs": 1, "precision": "fp16"}}, "fp16.toml")
    trained = evaluate.load_for_inference(str(exp_path), str(ckpt))
    assert trained.inputs.precision == "fp32" and trained.exp.train.precision == "fp32"
    assert 'trained with precision = "fp16"' in capsys.readouterr().err
    paths, logits, _ = evaluate.split_logits(trained, "val")
    assert len(paths) == len(logits) > 0 and bool(torch.isfinite(logits).all())
