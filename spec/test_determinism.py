"""Claim 16: a seeded run is bit-identical on the CPU, whatever the number of DataLoader workers.

Real runs (`run.run`) of a scratch CNN with BatchNorm, dropout and random augmentations (crop, flip,
colour jitter, erasing), so every source of randomness a run has is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgcls import augment, run

from .support import run_outputs, tiny_experiment


def seeded_run(tiny_data, out: Path, name: str, num_workers: int) -> dict:
    exp = tiny_experiment(tiny_data, out, name, data={"num_workers": num_workers})
    run.run(exp, progress=False)
    return run_outputs(out / name)


def check_identical(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        differ = [k for k in a["weights"][name] if a["weights"][name][k] != b["weights"][name][k]]
        assert not differ, f"{name}: weights differ: {differ}"
    assert a["metrics"] == b["metrics"]
    assert a["history"] == b["history"]


@pytest.mark.slow
def test_seeded_runs_are_bit_identical_with_0_and_2_workers(tiny_data, tmp_path, no_plots):
    """Seeded runs are bit-identical on CPU: the same experiment run twice gives identical weight bytes and
    metrics, with num_workers 0 and 2."""
    first = seeded_run(tiny_data, tmp_path, "w0", 0)
    check_identical(first, seeded_run(tiny_data, tmp_path, "w0_again", 0))
    check_identical(first, seeded_run(tiny_data, tmp_path, "w2", 2))


@pytest.mark.slow
def test_determinism_check_catches_augmentation_seeded_by_the_process(tiny_data, tmp_path, no_plots, monkeypatch):
    """Broken variant: augmentation randomness drawn from the loading process's RNG instead of (seed, epoch,
    index). Each worker is seeded differently from the main process, so 0 and 2 workers train differently."""
    monkeypatch.setattr(augment, "sample_seed", lambda seed, epoch, index: torch.initial_seed() + epoch * 1000 + index)
    with pytest.raises(AssertionError, match="weights differ"):
        check_identical(seeded_run(tiny_data, tmp_path, "w0", 0), seeded_run(tiny_data, tmp_path, "w2", 2))
