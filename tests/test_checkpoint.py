"""imgcls.checkpoint: safetensors files that never unpickle, detect damage, are written atomically
(a kill, a full disk or an unwritable folder leaves the previous file whole) and never hold NaN or
infinite weights."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgcls import checkpoint as ckpt_io
from imgcls import config, predict, run, rundir
from imgcls.errors import CheckpointError, UserError

from .fixtures import REPO, experiment, make_data


# ------------------------------------------------------------------------------ case 12: pickles


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

    # The lock file is opened in place on purpose: it holds no result, only whom the folder belongs to.
    assert direct == [rundir.LOCK], f"written in place: {direct}"
    assert set(renamed) == set(os.listdir(run_dir)) - {rundir.LOCK}, (renamed, os.listdir(run_dir))
    assert renamed[-1] == "metrics.json"  # written last: its presence marks a finished run


# ------------------------------------------------------------------- permissions: the umask's


@given(umask=st.integers(0, 0o777), replace=st.booleans(), from_proc=st.booleans())
@example(umask=0o022, replace=False, from_proc=True)  # the usual: 0644, readable by the group and others
@example(umask=0o077, replace=True, from_proc=True)  # private: 0600
@example(umask=0o002, replace=False, from_proc=False)  # a shared group: 0664
def test_a_result_file_gets_the_permissions_the_umask_gives_a_new_file(tmp_path_factory, umask, replace, from_proc):
    """mkstemp creates 0600 whatever the umask: a result file must be readable as `open` would make it,
    whether the umask is read from /proc (Linux) or by setting it and back (elsewhere)."""
    folder = tmp_path_factory.mktemp("umask")
    if replace:
        (folder / "metrics.json").write_text("old")
        os.chmod(folder / "metrics.json", 0o600)
    previous = os.umask(umask)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if not from_proc:
                mp.setattr(ckpt_io, "PROC_STATUS", str(folder / "no-such-status-file"))
            assert ckpt_io.current_umask() == umask
            ckpt_io.atomic_write(folder / "metrics.json", "{}")
        with open(folder / "reference", "w"):
            pass
    finally:
        os.umask(previous)
    expected = os.stat(folder / "reference").st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert os.stat(folder / "metrics.json").st_mode & 0o777 == expected
    assert (folder / "metrics.json").read_text() == "{}"


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


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text("abcdefgh._", min_size=1, max_size=12), min_size=2, max_size=30, unique=True))
def test_a_checkpoint_header_is_written_in_one_order_whatever_the_process(tmp_path, names):
    """safetensors writes its JSON header from a hash map: without sorting, the key order (and so
    the file's SHA-256) changed from process to process for the same tensors."""
    tensors = {name: torch.full((len(name),), float(i)) for i, name in enumerate(names)}
    path = tmp_path / "c.safetensors"
    ckpt_io.save(path, ckpt_io.Checkpoint(tensors, {"classes": ["a"], "epoch": 1}, {}, {}))
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    assert list(header) == sorted(header) and size % 8 == 0
    assert {k: torch.equal(v, tensors[k]) for k, v in ckpt_io.load(path).model.items()} == {k: True for k in tensors}


def test_saving_one_checkpoint_again_and_again_gives_one_file(tmp_path):
    """The header's inner metadata map was the one that changed order between saves."""
    tensors = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(8)}
    ckpt = ckpt_io.Checkpoint(tensors, {"classes": ["a", "b"], "epoch": 2}, {"s.0": torch.ones(2)}, {"torch": torch.zeros(4)})
    digests = set()
    for i in range(12):
        ckpt_io.save(tmp_path / f"{i}.safetensors", ckpt)
        digests.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(digests) == 1
