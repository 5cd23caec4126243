"""imgcls.rundir: interrupted runs (crashes, kill -9, Ctrl-C, SIGTERM, a full disk, NaNs) and
`--resume`, which is bit-identical, refuses a changed experiment or a foreign or pickled last
checkpoint, and never overwrites a finished run.

The resumed runs are compared against one uninterrupted run of the tiny experiment: the model
tensors of best and last, metrics.json and history.csv, minus the wall-clock fields.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from imgcls import checkpoint as ckpt_io
from imgcls import config, data, models, report, run, rundir
from imgcls.errors import UserError

from .fixtures import checkpoint_epoch, cli_env, experiment, fingerprint, make_data

EPOCHS, STEPS = 3, 4  # the tiny experiment: 16 training images in batches of 4


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way out can handle it."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def baseline(data_dir) -> dict:
    """The uninterrupted run's fingerprint."""
    exp = config.load(experiment(data_dir, {"name": "uninterrupted"}, "uninterrupted.toml"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(data_dir)
        run.run(exp, progress=False)
    return fingerprint(data_dir / "runs" / "uninterrupted")


def start(data_dir: Path, name: str, resume: bool, **overrides) -> None:
    exp = config.load(experiment(data_dir, {"name": name, **overrides}, f"{name}.toml"))
    cwd = os.getcwd()
    os.chdir(data_dir)
    try:
        run.run(exp, resume=resume, progress=False)
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------- where a crash lands


def at_optimizer_step(n: int):
    """Crash after the n-th optimizer step of this process (mid-epoch)."""

    def install(mp):
        count = [0]

        def hook(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == n:
                raise Crash(f"step {n}")

        return register_optimizer_step_post_hook(hook)  # removed by crash_run

    return install


def crash_before(module, attr: str, when, what: str):
    """Crash as `module.attr` is called with arguments for which `when(*args)` holds."""

    def install(mp):
        real = getattr(module, attr)

        def wrapper(*args):
            if when(*args):
                raise Crash(f"before {what}")
            return real(*args)

        mp.setattr(module, attr, wrapper)

    return install


def before_checkpoint(name: str, epoch: int):
    """Crash as the checkpoint `name` of `epoch` is about to be saved."""
    return crash_before(
        ckpt_io, "save", lambda path, ckpt: Path(path).name == name and ckpt.meta["epoch"] == epoch, f"{name} of epoch {epoch}"
    )


def before_history_with(rows: int):
    return crash_before(report, "write_history", lambda path, history: len(history) == rows, f"history.csv with {rows} rows")


def before_result(name: str):
    return crash_before(report, "write_json", lambda path, content: Path(path).name == name, name)


def crash_run(data_dir: Path, name: str, resume: bool, where, **overrides) -> None:
    with pytest.MonkeyPatch.context() as mp:
        handle = where(mp)
        try:
            with pytest.raises(Crash):
                start(data_dir, name, resume, **overrides)
        finally:
            if handle is not None:
                handle.remove()


# ------------------------------------------------------------------------------------ case 15


def test_crashes_at_every_kind_of_moment_then_resume_give_the_uninterrupted_bits(data_dir, baseline):
    """One run crashed six times (mid-epoch, between best and last, before a save, before the
    history, inside the final report), each time resumed. One resume trains its epochs with 2
    loader workers: a resume may change num_workers because that cannot change a single bit."""
    name = "crashed"
    crashes = [
        (at_optimizer_step(3), {}),  # epoch 1, nothing saved yet
        (before_checkpoint("last.safetensors", 1), {}),  # best of epoch 1 written, last not
        (before_checkpoint("last.safetensors", 2), {}),  # starts over; this time epoch 1 is saved
        (at_optimizer_step(2), {}),  # resumed after epoch 1: crashes mid-epoch 2
        (before_history_with(EPOCHS), {"data": {"num_workers": 2}}),  # after the last epoch's checkpoints
        (before_result("metrics.json"), {}),  # inside finish: plots and reports written, metrics not
    ]
    epochs_saved, steps = [], [0]

    def count(optimizer, args, kwargs):
        steps[-1] += 1

    handle = register_optimizer_step_post_hook(count)
    try:
        for i, (where, overrides) in enumerate(crashes):
            crash_run(data_dir, name, resume=i > 0, where=where, **overrides)
            epochs_saved.append(checkpoint_epoch(data_dir / "runs" / name / "last.safetensors"))
            steps.append(0)
        start(data_dir, name, resume=True)
    finally:
        handle.remove()
    assert epochs_saved == [0, 0, 1, 1, 3, 3]
    # Each resume starts after the last saved epoch (a restart from scratch would also give the same bits).
    assert steps == [3, STEPS, 2 * STEPS, 2, 2 * STEPS, 0, 0]
    assert fingerprint(data_dir / "runs" / name) == baseline


def test_resuming_a_changed_experiment_is_refused_listing_what_differs(data_dir):
    name = "changed"
    crash_run(data_dir, name, resume=False, where=before_checkpoint("last.safetensors", 2))
    with pytest.raises(UserError) as info:
        start(data_dir, name, resume=True, optimizer={"lr": 0.1}, data={"batch_size": 8, "num_workers": 1})
    message = str(info.value)
    assert "the experiment changed since the run started" in message
    assert "data.batch_size: 4 (run) vs 8 (now)" in message and "optimizer.lr: 0.05 (run) vs 0.1 (now)" in message
    assert "num_workers" not in message  # allowed: it cannot change results
    with pytest.raises(UserError, match="holds an unfinished run. Continue it with --resume"):
        start(data_dir, name, resume=False)
    start(data_dir, name, resume=True)
    with pytest.raises(UserError, match="already holds a finished run"):
        start(data_dir, name, resume=False)


def test_resuming_a_run_killed_after_its_last_write_reports_its_results(data_dir, baseline, monkeypatch, capsys):
    monkeypatch.chdir(data_dir)
    metrics = (data_dir / "runs" / "uninterrupted" / "metrics.json").stat().st_mtime_ns
    assert run.main([str(data_dir / "uninterrupted.toml"), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "already holds the finished run" in err
    assert out.startswith("val: accuracy ") and "best epoch 3 of 3" in out
    assert (data_dir / "runs" / "uninterrupted" / "metrics.json").stat().st_mtime_ns == metrics
    assert run.main([str(data_dir / "uninterrupted.toml")]) == 2  # without --resume a finished run is kept safe
    assert "already holds a finished run" in capsys.readouterr().err


def test_a_last_checkpoint_from_another_experiment_is_refused(data_dir, tmp_path):
    name = "swapped"
    crash_run(data_dir, name, resume=False, where=before_checkpoint("last.safetensors", 2))
    crash_run(data_dir, "other", resume=False, where=before_checkpoint("last.safetensors", 2), seed=9)
    shutil.copy(data_dir / "runs" / "other" / "last.safetensors", data_dir / "runs" / name / "last.safetensors")
    with pytest.raises(UserError, match=r"saved by a different experiment:\n  - name: \"other\" \(checkpoint\) vs \"swapped\""):
        start(data_dir, name, resume=True)


# ------------------------------------------------------------------------------ case 12: pickles


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


# ------------------------------------------------------------------------------- cases 15, 18


def interrupted_chain(data_dir: Path, name: str, workers: int, signals: list[int], log: list) -> None:
    """Start the run, and each time a new epoch's last checkpoint appears send the next signal;
    then --resume; finally let the last resume finish."""
    exp_path = experiment(data_dir, {"name": name, "data": {"num_workers": workers}}, f"{name}.toml")
    last = data_dir / "runs" / name / "last.safetensors"
    for i, sig in enumerate([*signals, None]):
        out = (data_dir / f"{name}.{i}.err").open("w+")
        args = [sys.executable, "-m", "imgcls.run", str(exp_path), "--quiet", *(["--resume"] if i else [])]
        env = cli_env(OMP_NUM_THREADS=str(torch.get_num_threads()))  # as many threads as the baseline had
        proc = subprocess.Popen(args, cwd=data_dir, env=env, stdout=subprocess.DEVNULL, stderr=out)
        saved = checkpoint_epoch(last)
        deadline = time.monotonic() + 300
        while sig is not None and proc.poll() is None and checkpoint_epoch(last) == saved:
            assert time.monotonic() < deadline
            time.sleep(0.003)
        if sig is not None:
            time.sleep(0.02 * i)  # a little later into the next epoch each time
            proc.send_signal(sig)
        proc.wait(timeout=300)
        out.seek(0)
        log.append((name, sig, proc.returncode, out.read()))
        out.close()


@pytest.mark.slow
def test_kill_9_and_sigterm_then_resume_give_the_uninterrupted_bits(data_dir, baseline):
    """`python -m imgcls.run EXP --resume` after kill -9 with 0 and with 2 loader workers, and after
    SIGTERM (exit 143, no traceback from any worker process): the finished run is bit-identical to
    the uninterrupted one. The two chains run side by side to share the start-up cost."""
    log: list = []
    chains = {
        "killed_w0": (0, [signal.SIGKILL]),
        "killed_w2": (2, [signal.SIGKILL, signal.SIGTERM]),
    }
    threads = [threading.Thread(target=interrupted_chain, args=(data_dir, name, w, sigs, log)) for name, (w, sigs) in chains.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected_codes = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143, None: 0}
    for name, sig, code, err in log:
        assert code == expected_codes[sig], (name, sig, code, err)
        assert "Traceback" not in err, (name, sig, err)  # also none from the loader's worker processes
        if sig == signal.SIGTERM:
            assert "terminated; every finished epoch is saved: continue with --resume" in err
    resumed = [err for name, sig, code, err in log if "resuming runs" in err]
    assert len(resumed) == 3, log  # every restart continued from a saved epoch
    assert len(log) == 5
    for name in chains:
        assert fingerprint(data_dir / "runs" / name) == baseline, name


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_cleanly_with_130_and_143_and_the_run_resumes(data_dir, baseline, monkeypatch, capsys, sig, code):
    """The signal arrives mid-epoch 2, sent to this very process."""
    name = f"signal{int(sig)}"
    exp_path = experiment(data_dir, {"name": name}, f"{name}.toml")
    count = [0]

    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == STEPS + 2:
            os.kill(os.getpid(), sig)

    monkeypatch.chdir(data_dir)
    # Ctrl-C reaches a foreground process, where Python turns SIGINT into KeyboardInterrupt. A test
    # process started in the background by a non-interactive shell (`pytest &`) inherits SIGINT
    # ignored, and Python then leaves it ignored: give it the foreground's handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    handle = register_optimizer_step_post_hook(hook)
    try:
        assert run.main([str(exp_path), "--quiet"]) == code
    finally:
        handle.remove()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.rstrip().endswith("every finished epoch is saved: continue with --resume") and "Traceback" not in err
    assert checkpoint_epoch(data_dir / "runs" / name / "last.safetensors") == 1
    assert run.main([str(exp_path), "--resume", "--quiet"]) == 0
    assert f"resuming {Path('runs') / name} after epoch 1" in capsys.readouterr().err
    assert fingerprint(data_dir / "runs" / name) == baseline


# ------------------------------------------------------------------------------- cases 16, 17


def test_leftover_temp_files_are_cleaned_and_never_resumed_from(data_dir, capsys):
    name = "leftovers"
    crash_run(data_dir, name, resume=False, where=before_checkpoint("last.safetensors", 2))
    run_dir = data_dir / "runs" / name
    # What a kill -9 during a save leaves: a temp file, here holding a later epoch than last.
    shutil.copy(run_dir / "best.safetensors", run_dir / f"{ckpt_io.TEMP_PREFIX}last.safetensors.x1y2")
    (run_dir / f"{ckpt_io.TEMP_PREFIX}metrics.json.a1b2").write_text("{")
    capsys.readouterr()
    crash_run(data_dir, name, resume=True, where=at_optimizer_step(1))
    assert f"resuming {Path('runs') / name} after epoch 1" in capsys.readouterr().err  # from last, not the temp file
    assert not list(run_dir.glob(ckpt_io.TEMP_PREFIX + "*"))


def test_disk_full_during_a_save_names_the_path_keeps_the_last_epoch_and_resumes(data_dir, baseline, monkeypatch, capsys):
    name = "diskfull"
    exp_path = experiment(data_dir, {"name": name}, f"{name}.toml")
    run_dir = data_dir / "runs" / name
    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) and fd >= 0 else ""
        if "last.safetensors" in target and checkpoint_epoch(run_dir / "last.safetensors") == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.chdir(data_dir)
    monkeypatch.setattr(os, "fsync", fsync)
    assert run.main([str(exp_path), "--quiet"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"error: {Path('runs') / name / 'last.safetensors'}: disk full while saving" in err, err
    assert "Traceback" not in err
    assert ckpt_io.load(run_dir / "last.safetensors").meta["epoch"] == 1
    assert not list(run_dir.glob(ckpt_io.TEMP_PREFIX + "*"))
    start(data_dir, name, resume=True)
    assert fingerprint(run_dir) == baseline


# ------------------------------------------------------------------------------------ case 19


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_no_checkpoint_holds_it(data_dir, monkeypatch, capsys):
    name = "nanloss"
    calls = [0]
    real_forward = torch.nn.CrossEntropyLoss.forward

    def forward(self, logits, target):
        calls[0] += 1
        loss = real_forward(self, logits, target)
        return loss * float("nan") if calls[0] == STEPS + 2 else loss  # epoch 2, step 2

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    monkeypatch.chdir(data_dir)
    assert run.main([str(experiment(data_dir, {"name": name}, f"{name}.toml")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the training loss became nan at epoch 2, step 2" in err and "Traceback" not in err, err
    run_dir = data_dir / "runs" / name
    for ckpt in ("best.safetensors", "last.safetensors"):
        saved = ckpt_io.load(run_dir / ckpt)
        assert saved.meta["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in saved.model.values() if t.is_floating_point())


def test_weights_that_turn_nan_without_a_nan_loss_are_not_saved(data_dir, monkeypatch, capsys):
    """The last step of epoch 2 leaves a NaN weight while every loss was finite: the save refuses."""
    name = "nanweights"
    count = [0]

    def poison(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == 2 * STEPS:
            optimizer.param_groups[0]["params"][0].data[0] = float("nan")

    handle = register_optimizer_step_post_hook(poison)
    try:
        monkeypatch.chdir(data_dir)
        assert run.main([str(experiment(data_dir, {"name": name}, f"{name}.toml")), "--quiet"]) == 2
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert "last.safetensors: not saved: the weights became NaN or infinite after epoch 2" in err, err
    run_dir = data_dir / "runs" / name
    assert ckpt_io.load(run_dir / "last.safetensors").meta["epoch"] == 1
    assert ckpt_io.load(run_dir / "best.safetensors").meta["epoch"] == 1  # the NaN val loss was not best


# ----------------------------------------------------------------------------- the run's inputs


def manifest_of(base: Path) -> dict:
    exp = config.load(experiment(base, {"data": {"train_dir": str(base / "data/train"), "val_dir": str(base / "data/val")}}))
    return rundir.manifest(exp, data.prepare(exp.data, progress=False))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.sampled_from(["train", "val"]), change=st.sampled_from(["changed", "added", "removed"]),
       cls=st.sampled_from(["cat", "dog"]), index=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_one_changed_image_changes_its_split_digest_and_no_other(tmp_path_factory, split, change, cls, index, seed):
    base = make_data(tmp_path_factory.mktemp("manifest"))
    before = manifest_of(base)
    folder = base / "data" / split / cls
    target = {"added": folder / f"new{seed}.png"}.get(change, folder / f"{index}.png")
    if change == "removed":
        target.unlink()
    else:  # an image no generated one equals: random pixels of another seed and size
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (21, 23, 3), dtype=np.uint8)).save(target)
    now = manifest_of(base)
    splits = before["data"]["splits"]
    assert {n for n in splits if splits[n]["digest"] != now["data"]["splits"][n]["digest"]} == {split}
    assert before["data"]["digest"] != now["data"]["digest"]
    assert rundir.data_changes(before, now) == [f"{split}: {change} {cls}/{target.name}"]


def test_a_manifest_records_every_file_the_weights_the_code_and_the_cpu(tmp_path):
    found = manifest_of(make_data(tmp_path))
    train = found["data"]["splits"]["train"]
    assert train["images"] == 16 and {f["class"] for f in train["files"]} == {"cat", "dog"}
    first = train["files"][0]
    assert first["path"] == "cat/0.png" and first["size"] == (tmp_path / "data/train/cat/0.png").stat().st_size
    assert first["sha256"] == hashlib.sha256((tmp_path / "data/train/cat/0.png").read_bytes()).hexdigest()
    assert found["weights"] == {"source": "none"}
    assert set(found["code"]) == {"version", "commit", "dirty"}
    assert {"torch", "threads", "cpu", "numpy", "pillow"} <= set(found["environment"])
    assert "flags" in found["environment"]["cpu"] and "model" in found["environment"]["cpu"]


def test_resume_refuses_data_changed_since_the_run_started_naming_the_file(tmp_path):
    base = make_data(tmp_path)
    crash_run(base, "swapped", resume=False, where=before_checkpoint("last.safetensors", 2))
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(base / "data" / "val" / "dog" / "1.png")
    with pytest.raises(UserError, match=r"inputs changed since the run started:\n  - val: changed dog/1.png\n"):
        start(base, "swapped", resume=True)


def test_a_local_weights_file_is_recorded_by_its_hash(tmp_path):
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, weights)
    identity = models.weights_identity(config.ResNet(arch="resnet18", weights=str(weights)))
    assert identity == {"source": "file", "path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


# --------------------------------------------------------------------- one run folder, one writer


HOLD_LOCK = """
import os, sys, time
from imgcls import rundir
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
rundir.lock(fd)
os.pwrite(fd, f"process {os.getpid()} on testhost\\n".encode(), 0)
print("locked", flush=True)
time.sleep(60)
"""

# The holder forks a child (as a loader or decode worker is) and is then killed; the child lives on.
HOLD_FORK_DIE = """
import os, signal, sys, time
from imgcls import rundir
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
rundir.lock(fd)
child = os.fork()
if child == 0:
    # Off the pipes the test reads: else subprocess.run would wait for this child to exit as well.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("resume", [False, True], ids=["second-run", "resume-while-running"])
def test_a_run_folder_in_use_is_refused_naming_its_holder_and_freed_by_kill_9(tmp_path, resume):
    base = make_data(tmp_path)
    run_dir = base / "runs" / "busy"
    if resume:
        crash_run(base, "busy", resume=False, where=before_checkpoint("last.safetensors", 2))
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / rundir.LOCK)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run_dir.iterdir())
        with pytest.raises(UserError, match=rf"{run_dir.name} is in use by process {holder.pid} on testhost"):
            start(base, "busy", resume=resume)
        assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process
        holder.wait()
    start(base, "busy", resume=resume)
    assert (run_dir / "metrics.json").exists()


def test_a_killed_runs_lingering_child_does_not_hold_its_folder(tmp_path):
    """A run killed with kill -9 leaves its loader workers alive for a few seconds; the folder's lock
    died with the run, so the --resume that follows at once is not refused (an flock, shared with
    forked children, refused it)."""
    base = make_data(tmp_path)
    run_dir = base / "runs" / "busy"
    run_dir.mkdir(parents=True)
    holder = subprocess.run([sys.executable, "-c", HOLD_FORK_DIE, str(run_dir / rundir.LOCK)], capture_output=True,
                            text=True, env=cli_env(), timeout=120)
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    child = int(holder.stdout.strip())
    try:
        os.kill(child, 0)  # still alive: it inherited the lock file's descriptor
        start(base, "busy", resume=False)
        assert (run_dir / "metrics.json").exists()
    finally:
        os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------- resume never destroys progress


def test_resume_without_last_checkpoint_is_refused_when_epochs_finished(tmp_path):
    """With last.safetensors lost, a resume used to restart at epoch 1 and overwrite best and history."""
    base = make_data(tmp_path)
    run_dir = base / "runs" / "lost"
    crash_run(base, "lost", resume=False, where=before_checkpoint("last.safetensors", 3))
    (run_dir / "last.safetensors").unlink()
    kept = {name: (run_dir / name).read_bytes() for name in ("best.safetensors", "history.csv")}
    with pytest.raises(UserError, match=r"holds history.csv and best.safetensors but no last.safetensors|holds history.csv but no"):
        start(base, "lost", resume=True)
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_resume_after_a_class_folder_was_renamed_is_refused_naming_the_files(tmp_path):
    base = make_data(tmp_path)
    crash_run(base, "renamed", resume=False, where=before_checkpoint("last.safetensors", 2))
    (base / "data" / "train" / "dog").rename(base / "data" / "train" / "hound")
    (base / "data" / "val" / "dog").rename(base / "data" / "val" / "hound")
    with pytest.raises(UserError, match=r"inputs changed since the run started:\n  - train: added hound/0.png"):
        start(base, "renamed", resume=True)
