"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_split


@pytest.fixture
def shapes_data(tmp_path: Path) -> Path:
    """train/val/test folders of three shape classes at 40x40 pixels."""
    make_split(tmp_path / "data" / "train", per_class=12, size=40, seed=1)
    make_split(tmp_path / "data" / "val", per_class=4, size=40, seed=2)
    make_split(tmp_path / "data" / "test", per_class=4, size=40, seed=3)
    return tmp_path / "data"
