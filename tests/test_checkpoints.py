"""Bad and hostile checkpoints, atomic writes, a full disk and non-finite numbers."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls import checkpoint as ckpt_io
from imgcls import config, evaluate, predict, run, train
from imgcls.errors import CheckpointError, UserError

from .tiny_data import REPO, experiment, make_data, make_split, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run: (base folder, experiment path, run directory)."""
    base = tmp_path_factory.mktemp("trained")
    exp_path = train_tiny(base, {"train": {"epochs": 1}})
    return base, exp_path, base / "runs" / "tiny"


# ------------------------------------------------------------------------------ case 12: pickles


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


@pytest.fixture
def hostile(tmp_path):
    """Pickle payloads dressed as checkpoints, and the marker file that proves one ran."""
    marker = tmp_path / "payload-ran"
    files = {
        "payload.pt": tmp_path / "payload.pt",
        "pickle.safetensors": tmp_path / "pickle.safetensors",
        "zip.safetensors": tmp_path / "zip.safetensors",
    }
    torch.save({"model.weight": Payload(marker)}, files["payload.pt"])
    files["pickle.safetensors"].write_bytes(pickle.dumps(Payload(marker)))
    shutil.copy(files["payload.pt"], files["zip.safetensors"])
    # The payload is live: an ordinary unpickling runs it. (Never done by imgcls.)
    pickle.loads(files["pickle.safetensors"].read_bytes())
    assert marker.exists()
    marker.unlink()
    return files, marker


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


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_resume_refuses_a_pickled_last_checkpoint_without_running_it(
    trained, hostile, tmp_path, monkeypatch, capsys, force_unsafe
):
    base, exp_path, run_dir = trained
    files, marker = hostile
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for name in ("pickle.safetensors", "zip.safetensors"):
        unfinished = tmp_path / "runs" / "tiny"
        shutil.rmtree(unfinished, ignore_errors=True)
        unfinished.mkdir(parents=True)
        shutil.copy(run_dir / "config.toml", unfinished)
        shutil.copy(files[name], unfinished / "last.safetensors")
        resumed = experiment(base, {"output": {"root": str(tmp_path / "runs")}, "train": {"epochs": 1}}, "resume.toml")
        monkeypatch.chdir(base)
        assert run.main([str(resumed), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "last.safetensors: not a readable safetensors file" in err and "Traceback" not in err, err
        assert not marker.exists(), f"{name}: the payload ran"


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_pretrained_weights_files_never_run_a_pickle(hostile, monkeypatch, force_unsafe):
    """model.weights may name a .pth state dict: it is read with weights_only, and never with the override."""
    files, marker = hostile
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for path in files.values():
        with pytest.raises(CheckpointError, match=str(path)):
            ckpt_io.read_weights(str(path))
        assert not marker.exists(), f"{path.name}: the payload ran"


# --------------------------------------------------------------------- case 13: damaged files


def test_every_sampled_bit_flip_is_detected_and_named(trained, tmp_path):
    _, _, run_dir = trained
    whole = (run_dir / "best.safetensors").read_bytes()
    ckpt_io.load(run_dir / "best.safetensors")  # the undamaged file loads
    damaged = tmp_path / "damaged.safetensors"
    rng = np.random.default_rng(0)
    header = int.from_bytes(whole[:8], "little") + 8
    # Flip bits in the length prefix, all over the JSON header and all over the tensor bytes.
    positions = [*range(8), *rng.integers(8, header, 60), *rng.integers(header, len(whole), 100), len(whole) - 1]
    for pos in positions:
        flipped = bytearray(whole)
        flipped[pos] ^= 1 << int(rng.integers(8))
        damaged.write_bytes(flipped)
        with pytest.raises(CheckpointError, match=str(damaged)):
            ckpt_io.load(damaged)


def test_truncated_checkpoints_are_detected_and_named(trained, tmp_path, monkeypatch, capsys):
    base, exp_path, run_dir = trained
    whole = (run_dir / "best.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in sorted(set(np.linspace(0, len(whole) - 1, 40).astype(int))):
        cut.write_bytes(whole[:size])
        with pytest.raises(CheckpointError, match=str(cut)):
            ckpt_io.load(cut)
    monkeypatch.chdir(base)
    assert predict.main([str(exp_path), str(cut), str(base / "data" / "val" / "cat" / "0.png")]) == 2
    assert f"error: {cut}: " in capsys.readouterr().err


def test_a_tensor_changed_consistently_in_size_still_fails_the_content_hash(trained, tmp_path):
    """Rewrite one weight as a valid safetensors file with the old header: only the hash can tell."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    _, _, run_dir = trained
    raw = (run_dir / "best.safetensors").read_bytes()
    tensors, metadata = st_load(raw), ckpt_io._metadata(raw)
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(st_save(tensors, metadata=metadata))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        ckpt_io.load(forged)


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


# ------------------------------------------------------------------- case 16: atomic writes


def test_an_interrupted_write_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    ckpt_io.atomic_write(target, "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.json"]


KILL_DURING_SAVE = """
import sys, torch
from imgcls import checkpoint as ckpt_io
versions = [torch.full((2_000_000,), float(v)) for v in (1, 2)]
i = 0
while True:
    ckpt_io.save(sys.argv[1], ckpt_io.Checkpoint({"w": versions[i % 2]}, {"version": i % 2 + 1}, {}, {}))
    i += 1
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "last.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(target)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline()  # one whole save done: there is a previous file to keep
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(ckpt_io.TEMP_PREFIX + "*")):  # a save is half-way
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    leftovers = list(tmp_path.glob(ckpt_io.TEMP_PREFIX + "*"))
    assert leftovers, "the kill did not land during a save"
    saved = ckpt_io.load(target)  # whole, and exactly one of the two versions
    assert torch.equal(saved.model["w"], torch.full((2_000_000,), float(saved.meta["version"])))
    assert ckpt_io.clean_temp_files(tmp_path) == leftovers
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_every_result_file_of_a_run_is_written_through_a_temp_file_and_rename(tmp_path, monkeypatch):
    make_data(tmp_path)
    exp_path = experiment(tmp_path, {"train": {"epochs": 1}})
    monkeypatch.chdir(tmp_path)
    run_dir = (tmp_path / "runs" / "tiny").resolve()
    direct, renamed = [], []

    def in_run_dir(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).parent == run_dir

    real_open, real_os_open, real_replace = open, os.open, os.replace

    def watched_open(file, mode="r", *args, **kwargs):
        if in_run_dir(file) and any(c in mode for c in "wax+"):
            direct.append(Path(file).name)
        return real_open(file, mode, *args, **kwargs)

    def watched_os_open(path, flags, *args, **kwargs):
        if in_run_dir(path) and flags & (os.O_WRONLY | os.O_RDWR) and not Path(path).name.startswith(ckpt_io.TEMP_PREFIX):
            direct.append(Path(path).name)
        return real_os_open(path, flags, *args, **kwargs)

    def watched_replace(src, dst, *args, **kwargs):
        if in_run_dir(dst):
            renamed.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watched_open)
    monkeypatch.setattr("io.open", watched_open)
    monkeypatch.setattr(os, "open", watched_os_open)
    monkeypatch.setattr(os, "replace", watched_replace)
    run.run(config.load(exp_path), progress=False)
    monkeypatch.undo()

    assert direct == [], f"written in place: {direct}"
    assert set(renamed) == set(os.listdir(run_dir)), (renamed, os.listdir(run_dir))
    assert renamed[-1] == "metrics.json"  # written last: its presence marks a finished run


# ------------------------------------------------------------------------ case 17: disk full


def test_disk_full_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    ckpt_io.save(target, ckpt_io.Checkpoint({"w": torch.ones(3)}, {"epoch": 1}, {}, {}))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ckpt_io.WriteError) as info:
        ckpt_io.save(target, ckpt_io.Checkpoint({"w": torch.zeros(3)}, {"epoch": 2}, {}, {}))
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(f"{target}: disk full while saving") and "--resume" in message
    assert isinstance(info.value, UserError)
    assert ckpt_io.load(target).meta["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_an_unwritable_folder_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", refused)
    with pytest.raises(ckpt_io.WriteError, match=rf"{tmp_path / 'x.json'}: cannot write \(Permission denied\)"):
        ckpt_io.atomic_write(tmp_path / "x.json", "{}")


# ------------------------------------------------------------------ case 19: non-finite numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_never_reach_a_checkpoint(tmp_path, bad):
    target = tmp_path / "best.safetensors"
    ckpt_io.save(target, ckpt_io.Checkpoint({"w": torch.ones(4)}, {"epoch": 1}, {}, {}))
    weights = torch.ones(4)
    weights[2] = bad
    with pytest.raises(ckpt_io.NonFiniteWeights, match="after epoch 2 \\(w\\)"):
        ckpt_io.save(target, ckpt_io.Checkpoint({"w": weights}, {"epoch": 2}, {}, {}))
    assert torch.equal(ckpt_io.load(target).model["w"], torch.ones(4))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_non_finite_metric_never_becomes_best(mode):
    for bad in (float("nan"), float("inf") if mode == "min" else float("nan")):
        monitor = train.Monitor(mode, patience=2)
        assert monitor.update(1, bad) == (False, False)  # not even as the first value
        assert monitor.best is None and monitor.best_epoch == 0
        assert monitor.update(2, 0.5)[0]
        assert monitor.update(3, bad) == (False, False)
        assert monitor.update(4, bad) == (False, True)  # counts as no improvement: patience runs out
        assert (monitor.best, monitor.best_epoch) == (0.5, 2)
