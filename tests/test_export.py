"""imgcls.export and predict --onnx: the exported file carries classes and preprocessing, agrees with
PyTorch on the val images (and a file that does not is refused), and classifies files as predict does."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys

import numpy as np
import pytest

from imgcls import checkpoint, config, data, evaluate, export, predict

from .fixtures import image_array

onnx = pytest.importorskip("onnx", reason="the export extra: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")
pytest.importorskip("onnxscript", reason="the export extra: pip install -e '.[export]'")

pytestmark = pytest.mark.slow

CKPT = "runs/tiny/best.safetensors"


@pytest.fixture(scope="module")
def exported(trained):
    """The tiny run exported once: (base, experiment path, ONNX path, what export printed)."""
    base, exp_path, _ = trained
    out = io.StringIO()
    with contextlib.chdir(base), contextlib.redirect_stdout(out):  # the experiment's data paths start there
        status = export.main([str(exp_path), CKPT, "--format", "onnx", "tiny.onnx"])
    assert status == 0, out.getvalue()
    return base, exp_path, base / "tiny.onnx", out.getvalue()


def test_the_file_carries_classes_and_preprocessing_and_parity_is_printed(exported):
    base, _, path, printed = exported
    assert "max |logit difference|" in printed and "top-1 agreement 100.00% (8/8)" in printed, printed
    worst = float(printed.split("max |logit difference| ")[1].split()[0])
    assert worst <= export.LOGIT_TOLERANCE

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    saved = checkpoint.load(base / CKPT)
    exp = saved.experiment(CKPT)
    mean, std = data.normalization(exp.data)
    assert json.loads(props["classes"]) == saved.classes == ["cat", "dog"]
    assert (int(props["image_size"]), int(props["resize_size"])) == (exp.data.image_size, exp.data.resize_size)
    assert json.loads(props["normalize_mean"]) == pytest.approx(mean)
    assert json.loads(props["normalize_std"]) == pytest.approx(std)
    assert props["experiment"] == config.to_toml(exp)
    assert props["experiment_sha256"] == hashlib.sha256(props["experiment"].encode()).hexdigest()
    assert props["checkpoint_sha256"] == hashlib.sha256((base / CKPT).read_bytes()).hexdigest()
    [graph_input] = model.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, exp.data.image_size, exp.data.image_size]


def perturbed(model_bytes: bytes) -> bytes:
    """The same graph with its largest float weight tensor shifted by 0.5."""
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    weights = max(floats, key=lambda t: np.prod(t.dims))
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) + 0.5, weights.name))
    return model.SerializeToString()


def test_a_perturbed_graph_fails_the_parity_check(exported):
    base, exp_path, path, _ = exported
    with contextlib.chdir(base):
        trained = evaluate.load_for_inference(str(exp_path), CKPT)
        good = export.parity(path.read_bytes(), trained)
        bad = export.parity(perturbed(path.read_bytes()), trained)
    assert good.ok and good.images == 8
    assert not bad.ok and bad.max_logit_difference > export.LOGIT_TOLERANCE, bad
    assert "FAILED" in bad.line()


def test_a_wrong_preprocessing_in_the_graph_exits_1_and_writes_no_file(trained, monkeypatch, capsys):
    """Channels fed in BGR order (a classic deployment bug) inside the graph: parity catches it."""
    base, exp_path, _ = trained
    monkeypatch.setattr(export.Deployed, "forward", lambda self, images: self.model(self.normalize(images.flip(1))))
    monkeypatch.chdir(base)
    assert export.main([str(exp_path), CKPT, "bgr.onnx"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and "bgr.onnx was not written" in err, (out, err)
    assert not (base / "bgr.onnx").exists()


def predictions(argv: list[str], capsys) -> list[dict]:
    assert predict.main([*argv, "--json", "--top-k", "2"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("count", [1, 5])
def test_predict_onnx_gives_the_checkpoints_classes_and_probabilities(exported, count, tmp_path, monkeypatch, capsys):
    """One and five images: the batch size is free in the graph."""
    base, exp_path, path, _ = exported
    from PIL import Image

    images = []
    for i in range(count):
        images.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image_array(i % 2, 500 + i, size=24 + 3 * i)).save(images[-1])
    monkeypatch.chdir(base)
    by_onnx = predictions(["--onnx", str(path), *images], capsys)
    by_checkpoint = predictions([str(exp_path), CKPT, *images], capsys)
    assert len(by_onnx) == len(by_checkpoint) == count
    for a, b in zip(by_onnx, by_checkpoint):
        assert a["path"] == b["path"]
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)


def test_without_the_extra_both_commands_name_it(exported, monkeypatch, capsys):
    base, exp_path, path, _ = exported
    monkeypatch.chdir(base)
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
        assert export.main([str(exp_path), CKPT, "again.onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnxscript is not installed" in err and "pip install -e '.[export]'" in err, err
    assert "Traceback" not in err and not (base / "again.onnx").exists()

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert predict.main(["--onnx", str(path), "data/val/cat/0.png"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime is not installed" in err and "pip install -e '.[export]'" in err, err
    assert "Traceback" not in err


def test_predict_onnx_refuses_a_file_that_is_not_an_export(exported, tmp_path, monkeypatch, capsys):
    base, _, path, _ = exported
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    (tmp_path / "text.onnx").write_text("not a model")
    monkeypatch.chdir(base)
    expected = {
        "bare.onnx": "an ONNX model, but not one imgcls.export wrote (its metadata lacks ['format', 'classes'",
        "text.onnx": "not a readable ONNX model",
        "absent.onnx": "not a readable ONNX model",
    }
    for name, words in expected.items():
        assert predict.main(["--onnx", str(tmp_path / name), "data/val/cat/0.png"]) == 2
        err = capsys.readouterr().err
        assert f"error: {tmp_path / name}: {words}" in err and "Traceback" not in err, err
