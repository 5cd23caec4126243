"""imgcls.verify: a run re-runs bit-identically; changed inputs are named before any training; the
first epoch that differs is named with the columns that differ; a cuda run is compared to a tolerance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from imgcls import checkpoint, data, run, verify

from .fixtures import fingerprint, image_array, train_tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 3-epoch run of the tiny experiment: (base folder, run directory). Tests must not change it."""
    base = tmp_path_factory.mktemp("verify")
    train_tiny(base)
    return base, base / "runs" / "tiny"


def tensors_in(run_dir: Path) -> int:
    return len(checkpoint.load(run_dir / "last.safetensors").model)


def calls_of_run(monkeypatch) -> list[dict]:
    """Record run.run's keyword arguments, still running it."""
    calls, real = [], run.run
    monkeypatch.setattr(run, "run", lambda exp, **kw: calls.append(kw) or real(exp, **kw))
    return calls


def test_a_run_verifies_bit_identically(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)  # the experiment's relative data paths start there
    calls = calls_of_run(monkeypatch)
    files = fingerprint(run_dir)
    assert verify.main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"bit-identical through epoch 3 ({tensors_in(run_dir)} tensors)"
    assert [c["stop_after"] for c in calls] == [3]
    assert fingerprint(run_dir) == files  # the run directory is only read
    assert sorted(p.name for p in base.iterdir()) == ["data", "exp.toml", "runs"]  # nothing written beside it


def test_epochs_1_verifies_only_the_first_epoch(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    calls = calls_of_run(monkeypatch)
    assert verify.main([str(run_dir), "--epochs", "1"]) == 0
    assert "bit-identical through epoch 1 (" in capsys.readouterr().out
    assert [c["stop_after"] for c in calls] == [1]


def test_the_first_divergent_epoch_is_named_with_what_differs(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    real = data.sample_seed
    # From epoch 2 on, another shuffle and other augmentations: epoch 1 stays bit-identical.
    monkeypatch.setattr(data, "sample_seed", lambda seed, epoch, index: real(seed + (epoch >= 2), epoch, index))
    assert verify.main([str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "does not reproduce: epoch 2 differs:" in out
    assert re.search(r"- weights: [0-9a-f]{64} \(run\) vs [0-9a-f]{64} \(re-run\)", out)
    assert re.search(r"- train_loss: \S+ \(run\) vs \S+ \(re-run\)", out)
    assert "epoch 1" not in out


def test_changed_data_is_named_before_any_training_and_anyway_finds_the_divergence(tmp_path, monkeypatch, capsys):
    train_tiny(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    Image.fromarray(image_array(0, 77)).save(tmp_path / "data" / "train" / "cat" / "0.png")
    monkeypatch.chdir(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("verify trained although the inputs changed")

    with monkeypatch.context() as m:
        m.setattr(run, "run", no_training)
        assert verify.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "inputs changed since the run" in err and "data: train: changed cat/0.png" in err
    assert "--anyway" in err

    assert verify.main([str(run_dir), "--anyway"]) == 1
    captured = capsys.readouterr()
    assert "data: train: changed cat/0.png" in captured.err
    assert "does not reproduce: epoch 1 differs:" in captured.out


@pytest.mark.parametrize(
    ("files", "message"),
    [([], "no such folder"), (["history.csv"], "holds no config.toml"), (["config.toml"], "holds no history.csv")],
)
def test_a_folder_that_is_no_run_is_a_user_error(tmp_path, capsys, files, message):
    folder = tmp_path / "runs" / "tiny"
    if files:
        folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("")
    assert verify.main([str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_a_damaged_manifest_is_a_user_error(tmp_path, monkeypatch, capsys):
    train_tiny(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "manifest.json").write_text('{"weights": "none"}')
    monkeypatch.chdir(tmp_path)
    assert verify.main([str(run_dir)]) == 2
    assert "manifest.json: damaged" in capsys.readouterr().err


def test_epochs_beyond_the_run_are_refused(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    assert verify.main([str(run_dir), "--epochs", "4"]) == 2
    assert "recorded epochs 1 to 3" in capsys.readouterr().err


# ------------------------------------------------------------- comparing histories (no training)


def row(epoch: int, loss: float, weights: str = "a" * 64) -> dict[str, str]:
    return {"epoch": str(epoch), "train_loss": repr(loss), "train_acc": "0.5", "val_loss": repr(loss + 0.1),
            "val_acc": "0.5", "lr": "0.05", "weights": weights}


def test_bit_identity_compares_every_column_including_the_weights_digest():
    before = [row(1, 0.7), row(2, 0.6)]
    assert verify.compare_histories(before, [row(1, 0.7), row(2, 0.6)], None) is None
    found = verify.compare_histories(before, [row(1, 0.7), row(2, 0.6, "b" * 64)], None)
    assert found == verify.Divergence(2, [("weights", "a" * 64, "b" * 64)])
    found = verify.compare_histories(before, [row(1, 0.7 + 1e-16)], None)
    assert found.epoch == 1 and [c for c, _, _ in found.columns] == ["train_loss", "val_loss"]
    assert verify.compare_histories(before, [row(1, 0.7)], None).epoch == 2  # the re-run stopped early


def test_a_cuda_run_is_compared_to_a_tolerance_without_the_weights_digest():
    tol = verify.GPU_REL_TOLERANCE
    before = [row(1, 0.7), row(2, 0.6), row(3, 0.5)]
    close = [row(1, 0.7 * (1 + tol / 10), "b" * 64), row(2, 0.6, "c" * 64), row(3, 0.5 * (1 - tol / 10), "d" * 64)]
    assert verify.compare_histories(before, close, tol) is None
    far = [row(1, 0.7, "b" * 64), row(2, 0.6 * (1 + 10 * tol)), row(3, 0.5)]
    found = verify.compare_histories(before, far, tol)
    assert found.epoch == 2 and [c for c, _, _ in found.columns] == ["train_loss", "val_loss"]
    line = verify.reproduced_line(3, 10, tol)
    assert "within rel 0.001 through epoch 3" in line and "not promised bit-identical" in line
    assert "bit-identical through" not in line
