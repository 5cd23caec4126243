"""Hypothesis profiles and the shared fixtures of the property suite.

HYPOTHESIS_PROFILE picks the profile: "dev" (default) explores new examples on every run and keeps
failures in .hypothesis/; "ci" is derandomized and keeps no database, so a CI failure reproduces
exactly. Both run few examples: every property is written to be meaningful at small sizes.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from imgcls import report

from .support import write_image_folders

# too_slow: on a shared 2-core machine, drawing a whole experiment can take longer than hypothesis expects.
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting made a 4x4x16x16 BatchNorm 500x slower (50 ms instead of 0.1 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_plots(monkeypatch):
    """Drawing curves and confusion matrices is most of a tiny run's time and part of no claim."""
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr(report, "plot_confusion", lambda *args, **kwargs: None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny ImageFolder tree: 3 classes, 8 training images each, PNGs of 16..32 pixels a side."""
    root = tmp_path_factory.mktemp("tiny_data")
    counts = {"train": 8, "val": 3, "test": 2}
    write_image_folders(root, {split: {c: n for c in ("apple", "kiwi", "plum")} for split, n in counts.items()}, seed=0)
    return root
