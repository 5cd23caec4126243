"""Shared pytest fixtures; what they are made of lives in fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fixtures import make_shapes_data, pickle_payloads, train_tiny


@pytest.fixture
def shapes_data(tmp_path: Path) -> Path:
    """train/val/test folders of three shape classes at 40x40 pixels."""
    return make_shapes_data(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run of the tiny experiment: (base folder, experiment path, run directory)."""
    base = tmp_path_factory.mktemp("trained")
    exp_path = train_tiny(base, {"train": {"epochs": 1}})
    return base, exp_path, base / "runs" / "tiny"


@pytest.fixture
def hostile(tmp_path):
    """Pickle payloads dressed as checkpoints, and the marker file that proves one ran."""
    return pickle_payloads(tmp_path)
