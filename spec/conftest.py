"""The shared fixtures of the property suite; its hypothesis profiles are the repository's
(conftest.py at the root: HYPOTHESIS_PROFILE=dev, ci or fuzz)."""

from __future__ import annotations

import pytest
import torch

from imgcls import report

from .support import write_image_folders


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
    monkeypatch.setattr(report, "plot_reliability", lambda *args, **kwargs: None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny ImageFolder tree: 3 classes, 8 training images each, PNGs of 16..32 pixels a side."""
    root = tmp_path_factory.mktemp("tiny_data")
    counts = {"train": 8, "val": 3, "test": 2}
    write_image_folders(root, {split: {c: n for c in ("apple", "kiwi", "plum")} for split, n in counts.items()}, seed=0)
    return root
