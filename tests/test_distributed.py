"""imgcls.distributed and the run under torchrun: the same samples per step and the same evaluation
as one process, on the CPU (gloo); a rank killed mid-run ends the job and --resume finishes it exactly."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgcls import config, data, distributed, rundir, verify
from imgcls.errors import ConfigError

from .fixtures import checkpoint_epoch, cli, cli_env, experiment, fingerprint, make_data

# Dropout off: each rank draws its own masks, so only a dropout-free model can match one process.
# Class weights and label smoothing, and 18 training images in batches of 4 (the last step's 2
# images split 1 + 1): a step's loss must still be the global batch's weighted mean.
SAME_AS_ONE = {"model": {"dropout": 0.0}, "train": {"epochs": 1, "class_weights": {"cat": 2.0}, "label_smoothing": 0.1}}
TRAIN_PER_CLASS = 9
# Weights of one epoch (4 steps) agree this closely: the all-reduce adds the ranks' gradients in another order.
ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("order", ["shuffle", "balanced"])
@pytest.mark.parametrize("n,batch,size", [(16, 4, 2), (19, 6, 3), (10, 4, 2), (7, 4, 4)])
def test_ranks_slice_every_global_batch(n, batch, size, order):
    """Rank by rank, the slices of each step add up to the single process's batch of that step."""
    labels = [i % 3 for i in range(n)]
    one = data.EpochBatches(labels, batch, order, seed=5)
    ranks = [data.EpochBatches(labels, batch, order, 5, distributed.World(r, r, size, "gloo")) for r in range(size)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    steps = list(zip(*[list(r) for r in ranks]))
    assert len(steps) == len(one) == len(ranks[0])
    for single, parts in zip(one, steps):
        assert [k for part in parts for k in part] == single


@pytest.mark.parametrize("n,size", [(7, 2), (8, 3), (2, 4), (1, 2)])
def test_evaluation_shards_cover_the_split_once(n, size):
    """Each rank scores a disjoint shard; together they hold every image exactly once, with no padding."""
    samplers = [data.EpochBatches([0] * n, 3, "in_order", 0, distributed.World(r, r, size, "gloo")) for r in range(size)]
    keys = [k for s in samplers for batch in s for _, k in batch]
    assert sorted(keys) == list(range(n))
    assert [len(list(s)) for s in samplers] == [len(s) for s in samplers]


def test_a_batch_size_that_does_not_divide_names_both_numbers():
    with pytest.raises(ConfigError, match=r"batch_size = 6 .* 4 processes"):
        distributed.check_batch(6, distributed.World(0, 0, 4, "gloo"))
    distributed.check_batch(8, distributed.World(0, 0, 4, "gloo"))


def test_one_process_without_torchrun_variables():
    assert distributed.from_env("cpu", {}) == distributed.World()
    world = distributed.from_env("cpu", {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (world.rank, world.local_rank, world.size, world.backend, world.is_main) == (3, 1, 4, "gloo", False)


def test_world_size_and_backend_are_inputs_that_can_change_bits(tmp_path):
    """The manifest of a run of several processes records them, so verify (and --resume, compare)
    name a change of world size as a change of the environment; one process records nothing new."""
    make_data(tmp_path)
    exp = config.load(experiment(tmp_path, {"data": {"train_dir": str(tmp_path / "data/train"),
                                                      "val_dir": str(tmp_path / "data/val")}}))
    dataset = data.prepare(exp.data, progress=False)
    one = rundir.manifest(exp, dataset)
    two = rundir.manifest(exp, dataset, distributed.World(0, 0, 2, "gloo"))
    assert "distributed" not in one["environment"]
    assert two["environment"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    changes = verify.input_changes(two, one)
    assert changes and all(line.startswith("environment.distributed") for line in changes), changes


# ------------------------------------------------------------------------------------ torchrun


def torchrun(base: Path, exp: Path, *args: str, launcher: list[str] | None = None, log: str = "") -> subprocess.Popen:
    launcher = launcher or ["--standalone", "--nproc_per_node", "2"]
    env = cli_env(IMGCLS_BATCH_LOG=str(base / log)) if log else cli_env()
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "imgcls.run", str(exp), "--quiet", *args],
        cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def steps(base: Path, log: str) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the keys of every rank's slice, in rank order."""
    found: dict[tuple[int, int], list[int]] = {}
    for rank in range(4):
        path = base / f"{log}.rank{rank}"
        if path.exists():
            for line in path.read_text().splitlines():
                epoch, step, keys = ast.literal_eval(line)
                found.setdefault((epoch, step), []).extend(keys)
    return found


def same_as_one_experiment(base: Path) -> Path:
    """The tiny data with a validation split of 7 images (odd, so two ranks cannot split it evenly),
    and the experiment every run of this comparison trains."""
    make_data(base, train=TRAIN_PER_CLASS)
    (base / "data" / "val" / "dog" / "3.png").unlink()
    return experiment(base, SAME_AS_ONE)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny experiment in one plain process."""
    base = tmp_path_factory.mktemp("one")
    exp = same_as_one_experiment(base)
    finished(cli("run", str(exp), "--quiet", cwd=base, env=cli_env(IMGCLS_BATCH_LOG=str(base / "batches"))))
    return base


def same_run_as_one_process(base: Path, one: Path) -> None:
    """What two ranks must share with one process: the samples of every step, the weights (to
    ATOL/RTOL), and the evaluation: every validation image counted once, the same confusion matrix."""
    two_ranks, one_rank = steps(base, "batches"), steps(one, "batches")
    assert two_ranks == one_rank and one_rank
    assert len(two_ranks[(1, 0)]) == 4 and len(two_ranks[(1, 4)]) == 2  # both ranks' parts
    a, b = load_file(base / "runs/tiny/last.safetensors"), load_file(one / "runs/tiny/last.safetensors")
    weights = [k for k in a if k.startswith("model.")]
    assert weights and sorted(weights) == sorted(k for k in b if k.startswith("model."))
    for k in weights:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)
    mine, theirs = (json.loads((d / "runs/tiny/metrics.json").read_text())["val"] for d in (base, one))
    assert mine["images"] == theirs["images"] == 7
    assert sum(map(sum, mine["confusion_matrix"])) == 7
    assert mine["confusion_matrix"] == theirs["confusion_matrix"]
    predictions = (base / "runs/tiny/predictions_val.csv").read_text().splitlines()[1:]
    assert len(predictions) == len(set(predictions)) == 7


@pytest.mark.slow
def test_two_processes_train_on_the_single_process_batches(tmp_path, one_process):
    exp = same_as_one_experiment(tmp_path)
    finished(torchrun(tmp_path, exp, log="batches"))
    same_run_as_one_process(tmp_path, one_process)
    manifest = json.loads((tmp_path / "runs/tiny/manifest.json").read_text())
    assert manifest["environment"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "distributed" not in json.loads((one_process / "runs/tiny/manifest.json").read_text())["environment"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_localhost_train_as_one_process(tmp_path, one_process):
    """Two torchrun launchers of one process each, meeting at a c10d rendezvous: two "machines"."""
    exp = same_as_one_experiment(tmp_path)
    port = free_port()
    nodes = [
        torchrun(tmp_path, exp, log="batches", launcher=[
            "--nnodes", "2", "--node-rank", str(rank), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-machines"])
        for rank in range(2)
    ]
    for node in nodes:
        finished(node)
    same_run_as_one_process(tmp_path, one_process)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for pid in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_resume_finishes_it_exactly(tmp_path):
    """kill -9 of rank 1 after an epoch: the job exits, promptly, saying how to continue; --resume then
    gives the bits of the uninterrupted two-process run (dropout on: every rank's RNG is restored)."""
    make_data(tmp_path)
    reference = experiment(tmp_path, {"name": "whole", "train": {"epochs": 6}}, "whole.toml")
    exp = experiment(tmp_path, {"name": "killed", "train": {"epochs": 6}}, "killed.toml")
    whole = torchrun(tmp_path, reference)
    killed = torchrun(tmp_path, exp)
    last = tmp_path / "runs/killed/last.safetensors"
    while checkpoint_epoch(last) < 1 and killed.poll() is None:
        time.sleep(0.02)
    pid = rank_pid(killed, 1)
    assert pid is not None and killed.poll() is None, "the run ended before it could be killed"
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    out, err = killed.communicate(timeout=120)
    assert time.monotonic() - start < 60
    assert killed.returncode != 0
    assert "another process of the run stopped" in err and "continue with --resume" in err, err[-3000:]
    assert checkpoint_epoch(last) < 6, "the kill came after the last epoch"
    assert not (tmp_path / "runs/killed/metrics.json").exists()
    finished(torchrun(tmp_path, exp, "--resume"))
    finished(whole)
    assert fingerprint(tmp_path / "runs/killed") == fingerprint(tmp_path / "runs/whole")


@pytest.mark.slow
def test_a_refused_claim_stops_every_rank_with_rank_0s_reason(one_process):
    """torchrun into the folder of a finished run: rank 0 refuses the claim, and rank 1 stops at once
    with the same reason of its own (it used to wait for rank 0 until torchrun killed it, or, on
    another machine, until the collectives' timeout). The finished run is left as it was."""
    before = fingerprint(one_process / "runs/tiny")
    exp = experiment(one_process, SAME_AS_ONE)
    start = time.monotonic()
    proc = torchrun(one_process, exp, launcher=["--standalone", "--nproc_per_node", "2", "--tee", "3"])
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    for rank in (0, 1):
        assert any(f"{rank}]:error: " in line and "already holds a finished run" in line for line in (out + err).splitlines()), (out + err)[-3000:]
    assert fingerprint(one_process / "runs/tiny") == before
