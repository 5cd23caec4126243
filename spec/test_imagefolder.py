"""Claim 14: ImageFolder labelling, through `data.scan_classes` and `data.scan_split`.

Scanning never decodes, so the generated trees hold empty .png files; `data.prepare`, which decodes,
is exercised by the end-to-end runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from torchvision.datasets.folder import find_classes

from imgcls import data

from .support import falsify

# Folder names: letters of both cases, digits, '-', '_' and a few non-ASCII letters, so that sorting by code
# point (what ImageFolder does) differs from sorting ignoring case or by locale.
names = st.text(st.sampled_from("abcABZz019-_éß"), min_size=1, max_size=6).filter(lambda n: not n.startswith("."))


@st.composite
def trees(draw) -> dict:
    classes = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    return {
        "classes": classes,
        "train": {c: draw(st.integers(1, 3)) for c in classes},
        # val and test: any subset of the classes (possibly missing some, even the first), one file or more each
        "val": {c: draw(st.integers(1, 2)) for c in draw(st.lists(st.sampled_from(classes), unique=True))},
        "test": {c: draw(st.integers(1, 2)) for c in draw(st.lists(st.sampled_from(classes), min_size=1, unique=True))},
        "hidden": draw(st.booleans()),  # a ".cache" folder beside the classes is never a class
    }


def write_tree(root: Path, tree: dict) -> None:
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        if tree["hidden"]:
            (root / split / ".cache").mkdir()
            (root / split / ".cache" / "x.png").touch()
        for cls, count in tree[split].items():
            (root / split / cls).mkdir()
            for i in range(count):
                (root / split / cls / f"{i}.png").touch()


def check_labels(scan, root: Path, tree: dict) -> None:
    classes = data.scan_classes(str(root / "train"))
    assert classes == sorted(tree["classes"])  # the folder names, sorted by code point
    if not tree["hidden"]:  # torchvision would make ".cache" a class too; imgcls never does
        assert classes == find_classes(str(root / "train"))[0]
    for split in ("train", "val", "test"):
        scanned = scan(split, str(root / split), classes)
        assert sorted(Path(p).parent.name for p in scanned.paths) == sorted(
            c for c, n in tree[split].items() for _ in range(n)
        )
        for path, label in zip(scanned.paths, scanned.labels):
            assert classes[label] == Path(path).parent.name, (split, path, label)


@settings(max_examples=15)
@given(tree=trees())
@example(
    tree={
        "classes": ["b", "a", "B"],
        "train": {"b": 1, "a": 1, "B": 1},
        "val": {"b": 1},
        "test": {"a": 1},
        "hidden": True,
    }
)
def test_folder_names_are_labels_in_sorted_order_with_trains_mapping(tmp_path_factory, tree):
    """ImageFolder: class folder names are the labels, in sorted order; val and test are labelled with train's
    mapping even when a split lacks a class."""
    root = tmp_path_factory.mktemp("tree")
    write_tree(root, tree)
    check_labels(data.scan_split, root, tree)


def test_label_check_catches_per_split_mappings_and_listing_order(tmp_path_factory):
    """Broken variants: each split labelled by its own sorted folders, and labels in directory-listing order."""

    def own_mapping(name, root, classes):
        return data.scan_split(name, root, data.scan_classes(root))

    def listing_order(name, root, classes):
        split = data.scan_split(name, root, classes)
        order = [c for c in os.listdir(Path(root).parent / "train") if not c.startswith(".")]
        split.labels = [order.index(classes[label]) for label in split.labels]
        return split

    def check(scan):
        return lambda tree: check_labels(scan, write_and_return(tmp_path_factory, tree), tree)

    falsify(check(own_mapping), trees(), max_examples=100)
    falsify(check(listing_order), trees(), max_examples=100)


def write_and_return(tmp_path_factory, tree: dict) -> Path:
    root = tmp_path_factory.mktemp("tree")
    write_tree(root, tree)
    return root
