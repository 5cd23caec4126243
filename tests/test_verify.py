"""imgcls.verify: a run re-runs bit-identically; changed inputs are named before any training; the
first epoch that differs is named with the columns that differ; a cuda run is compared to a tolerance."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from imgcls import augment, checkpoint, config, run, train, verify

from .fixtures import fingerprint, image_array, train_tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-epoch run of the tiny experiment: (base folder, run directory). Tests must not change it."""
    base = tmp_path_factory.mktemp("verify")
    train_tiny(base, {"train": {"epochs": 2}})
    return base, base / "runs" / "tiny"


def copy_of(tiny_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny run with its data, for a test that changes either."""
    base = shutil.copytree(tiny_run[0], tmp_path / "copy")
    return base, base / "runs" / "tiny"


def tensors_in(run_dir: Path) -> int:
    return len(checkpoint.load(run_dir / "last.safetensors").model)


def count_epochs_trained(monkeypatch) -> list[int]:
    """Record the epoch of every train.train_one_epoch call, still training."""
    epochs, real = [], train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda feed, opt, epoch, progress: epochs.append(epoch) or real(feed, opt, epoch, progress))
    return epochs


def test_a_run_verifies_bit_identically(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)  # the experiment's relative data paths start there
    epochs = count_epochs_trained(monkeypatch)
    files = fingerprint(run_dir)
    assert verify.main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"bit-identical through epoch 2 ({tensors_in(run_dir)} tensors)"
    assert epochs == [1, 2]
    assert fingerprint(run_dir) == files  # the run directory is only read
    assert sorted(p.name for p in base.iterdir()) == ["data", "exp.toml", "runs"]  # nothing written beside it


def test_epochs_1_trains_and_verifies_only_the_first_epoch(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    epochs = count_epochs_trained(monkeypatch)
    assert verify.main([str(run_dir), "--epochs", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"bit-identical through epoch 1 ({tensors_in(run_dir)} tensors)"
    assert epochs == [1]


def test_the_first_divergent_epoch_is_named_with_what_differs(tiny_run, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    real = augment.sample_seed
    # From epoch 2 on, another shuffle in the re-run: its epoch 1 stays bit-identical.
    monkeypatch.setattr(augment, "sample_seed", lambda seed, epoch, index: real(seed + (epoch >= 2), epoch, index))
    assert verify.main([str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "does not reproduce: epoch 2 differs:" in out
    assert re.search(r"- weights: [0-9a-f]{64} \(run\) vs [0-9a-f]{64} \(re-run\)", out)
    assert re.search(r"- train_loss: \S+ \(run\) vs \S+ \(re-run\)", out)
    assert "epoch 1" not in out


def test_changed_data_is_named_before_any_training_and_anyway_finds_the_divergence(tiny_run, tmp_path, monkeypatch, capsys):
    base, run_dir = copy_of(tiny_run, tmp_path)
    Image.fromarray(image_array(0, 77)).save(base / "data" / "train" / "cat" / "0.png")
    monkeypatch.chdir(base)

    def no_training(*args, **kwargs):
        raise AssertionError("verify trained although the inputs changed")

    with monkeypatch.context() as m:
        m.setattr(run, "run", no_training)
        assert verify.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "inputs changed since the run" in err and "data: train: changed cat/0.png" in err
    assert "--anyway" in err and "re-running" not in err

    assert verify.main([str(run_dir), "--anyway"]) == 1
    captured = capsys.readouterr()
    assert "data: train: changed cat/0.png" in captured.err
    assert "does not reproduce: epoch 1 differs:" in captured.out


def test_changed_code_and_environment_are_named_key_by_key():
    before = {"data": {"splits": {}}, "weights": {"source": "none"}, "code": {"commit": "a1", "dirty": False},
              "environment": {"torch": "2.4.0", "variables": {"OMP_NUM_THREADS": None}}}
    now = {"data": {"splits": {}}, "weights": {"source": "none"}, "code": {"commit": "b2", "dirty": False},
           "environment": {"torch": "2.5.1", "variables": {"OMP_NUM_THREADS": "4"}}}
    assert verify.input_changes(before, now) == [
        'code.commit: "a1" (run) vs "b2" (now)',
        'environment.torch: "2.4.0" (run) vs "2.5.1" (now)',
        'environment.variables.OMP_NUM_THREADS: absent (run) vs "4" (now)',
    ]
    assert verify.input_changes(before, before) == []


def test_a_run_whose_output_root_is_read_only_now_still_verifies(tiny_run, monkeypatch, capsys):
    """Only the scratch folder is written, so only it must be writable."""
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    runs = run_dir.parent  # the run's output.root: read-only now
    monkeypatch.setattr(config, "_unwritable", lambda folder: "read-only" if Path(folder).is_relative_to(runs) else None)
    assert verify.main([str(run_dir), "--epochs", "1"]) == 0
    assert "bit-identical through epoch 1" in capsys.readouterr().out


def test_started_elsewhere_it_names_the_folder_the_run_started_in(tiny_run, tmp_path, monkeypatch, capsys):
    base, run_dir = tiny_run
    monkeypatch.chdir(tmp_path)
    assert verify.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "data.train_dir: folder 'data/train' does not exist" in err
    assert f"start it in the folder the run was started in ({base}, by output.root and name)" in err


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


def test_a_damaged_manifest_is_a_user_error(tiny_run, tmp_path, monkeypatch, capsys):
    base, run_dir = copy_of(tiny_run, tmp_path)
    (run_dir / "manifest.json").write_text('{"weights": "none"}')
    monkeypatch.chdir(base)
    assert verify.main([str(run_dir)]) == 2
    assert "manifest.json: damaged" in capsys.readouterr().err


def test_a_history_without_weight_digests_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text((Path(__file__).parent.parent / "experiments" / "scratch_cnn.toml").read_text())
    (run_dir / "history.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,lr\n1,0.7,0.5,0.8,0.5,0.05\n")
    assert verify.main([str(run_dir)]) == 2
    assert "history.csv has no weights column" in capsys.readouterr().err


@pytest.mark.parametrize("epochs", ["3", "0"])
def test_epochs_outside_the_run_are_refused(tiny_run, monkeypatch, capsys, epochs):
    base, run_dir = tiny_run
    monkeypatch.chdir(base)
    assert verify.main([str(run_dir), "--epochs", epochs]) == 2
    assert f"--epochs {epochs}: {run_dir} recorded epochs 1 to 2" in capsys.readouterr().err


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


def test_the_verdict_says_which_comparison_passed(capsys):
    tol = verify.GPU_REL_TOLERANCE
    before = [row(1, 0.7), row(2, 0.6)]
    close = [row(1, 0.7), row(2, 0.6 * (1 + tol / 10), "b" * 64)]
    far = [row(1, 0.7), row(2, 0.6 * (1 + 10 * tol), "b" * 64)]
    assert verify.verdict(Path("r"), before, before, 10, cuda=True) == 0
    assert capsys.readouterr().out == "bit-identical through epoch 2 (10 tensors)\n"
    assert verify.verdict(Path("r"), before, close, 10, cuda=True) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"reproduced within a relative tolerance of {tol:g} through epoch 2")
    assert "not bit-identical (a cuda run is not promised bit-identical)" in out and "first differs at epoch 2" in out
    assert verify.verdict(Path("r"), before, far, 10, cuda=True) == 1
    assert f"does not reproduce within a relative tolerance of {tol:g}" in capsys.readouterr().out
    assert verify.verdict(Path("r"), before, close, 10, cuda=False) == 1  # the cpu promises bits
    assert "r does not reproduce: epoch 2 differs:" in capsys.readouterr().out
