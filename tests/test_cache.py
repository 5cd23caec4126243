"""The decoded cache: reused without decoding, rebuilt when damaged, the same bytes for any pool size
or race, and runs that cannot tell a cache hit from a miss."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls import cache, config, decoding, run

from .fixtures import experiment, fingerprint, image_array, make_data, make_split

RESIZE = 24


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.decoded"))


def split_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


def build(paths: list[str], folder: Path, workers: int = 1) -> cache.Cached:
    return cache.decoded_split(paths, RESIZE, str(folder), workers, progress=False, name="train")


def refuse_decoding(monkeypatch) -> None:
    monkeypatch.setattr(decoding, "read", lambda *a, **k: pytest.fail("an image was decoded"))


def test_a_second_preflight_decodes_nothing(tmp_path, monkeypatch):
    paths = split_paths(make_split(tmp_path / "train", 3))
    first = build(paths, tmp_path / "cache")
    assert not first.hit and len(cache_files(tmp_path / "cache")) == 1
    refuse_decoding(monkeypatch)
    second = build(paths, tmp_path / "cache")
    assert second.hit
    assert [torch.equal(a, b) for a, b in zip(first.images, second.images)] == [True] * len(paths)
    assert second.sha256 == first.sha256 and second.images.phashes == first.images.phashes


def test_cached_images_are_the_decoders_pixels(tmp_path):
    paths = split_paths(make_split(tmp_path / "train", 2))
    found = build(paths, tmp_path / "cache")
    assert found.kept == list(range(len(paths)))
    for path, image in zip(paths, found.images):
        assert torch.equal(image, decoding.decode(path, RESIZE))


@settings(max_examples=10, deadline=None)
@given(sides=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_any_mix_of_sizes_round_trips(tmp_path_factory, sides, seed):
    """Shapes and offsets of a drawn mix of image sizes (thin ones included) come back exactly."""
    folder = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sides):
        if max(h, w) > decoding.MAX_ASPECT * min(h, w):
            w = h  # decode refuses those; its refusal is tested in test_data
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    found = build(paths, folder / "cache")
    assert [tuple(im.shape) for im in found.images] == found.images.shapes
    for path, image in zip(paths, found.images):
        assert torch.equal(image, decoding.decode(path, RESIZE))


@settings(max_examples=15, deadline=None)
@given(indices=st.lists(st.integers(0, 5), max_size=12), broken=st.sampled_from([[], [2], [0, 4]]))
def test_take_gives_each_image_in_any_order_with_repeats(tmp_path_factory, indices, broken):
    """Decoded.take merges the reads of images stored back to back; in any order, with repeats, and
    with undecodable files among them (they store no pixels), each image comes back as its own."""
    folder = tmp_path_factory.mktemp("take")
    rng = np.random.default_rng(len(indices))
    paths = []
    for i in range(6 + len(broken)):
        paths.append(str(folder / f"{i}.png"))
        if i in broken:
            Path(paths[-1]).write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (10 + i, 14 - i, 3), dtype=np.uint8)).save(paths[-1])
    found = build(paths, folder / "cache")
    readable = [p for i, p in enumerate(paths) if i not in broken]
    assert len(found.kept) == len(readable) == 6
    for i, image in zip(indices, found.images.take(indices)):
        assert torch.equal(image, decoding.decode(readable[i], RESIZE)), i


@pytest.mark.parametrize("damage", ["flip a pixel byte", "cut the end", "cut to nothing", "garble the index"])
def test_a_damaged_cache_file_is_rebuilt_never_read(tmp_path, capsys, damage):
    paths = split_paths(make_split(tmp_path / "train", 2))
    first = build(paths, tmp_path / "cache")
    [file] = cache_files(tmp_path / "cache")
    good = file.read_bytes()
    blob = bytearray(good)
    if damage == "flip a pixel byte":
        blob[5] ^= 1
    elif damage == "cut the end":
        blob = blob[:-7]
    elif damage == "cut to nothing":
        blob = bytearray()
    else:
        blob[-cache.FOOTER.size - 10] = ord("#")
    file.write_bytes(bytes(blob))
    second = build(paths, tmp_path / "cache")
    assert not second.hit
    assert "rebuilding it" in capsys.readouterr().err
    assert file.read_bytes() == good
    assert all(torch.equal(a, b) for a, b in zip(first.images, second.images))


def test_pool_sizes_write_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "POOL_MIN_IMAGES", 0)  # the pool even for a handful of images
    paths = split_paths(make_split(tmp_path / "train", 6))
    build(paths, tmp_path / "one", workers=1)
    build(paths, tmp_path / "two", workers=2)
    [one], [two] = cache_files(tmp_path / "one"), cache_files(tmp_path / "two")
    assert one.name == two.name
    assert one.read_bytes() == two.read_bytes()


def _build_in_process(paths: list[str], folder: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    cache.decoded_split(paths, RESIZE, folder, 1, progress=False, name="train")


def test_two_processes_building_one_cache_do_not_corrupt_it(tmp_path):
    paths = split_paths(make_split(tmp_path / "train", 8))
    build(paths, tmp_path / "alone")
    [alone] = cache_files(tmp_path / "alone")
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    builders = [context.Process(target=_build_in_process, args=(paths, str(tmp_path / "shared"), start)) for _ in range(2)]
    for b in builders:
        b.start()
    start.set()
    for b in builders:
        b.join(120)
    assert [b.exitcode for b in builders] == [0, 0]
    assert [f.read_bytes() for f in cache_files(tmp_path / "shared")] == [alone.read_bytes()]
    assert not [p for p in (tmp_path / "shared").iterdir() if p.suffix != ".decoded"]  # no temp file left


def test_bad_files_are_reported_from_the_cache_under_their_current_names(tmp_path, monkeypatch):
    """An unreadable file's reason is cached (not decoded again) and names where the file is now."""
    root = make_split(tmp_path / "a", 2)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    first = build(split_paths(root), tmp_path / "cache")
    os.rename(tmp_path / "a", tmp_path / "b")
    refuse_decoding(monkeypatch)
    second = build(split_paths(tmp_path / "b"), tmp_path / "cache")
    assert second.hit
    assert len(first.failures) == len(second.failures) == 1
    assert second.failures[0] == first.failures[0].replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_changed_bytes_miss_the_cache(tmp_path):
    root = make_split(tmp_path / "train", 2)
    build(split_paths(root), tmp_path / "cache")
    Image.fromarray(image_array(0, 999)).save(root / "cat" / "0.png")
    assert not build(split_paths(root), tmp_path / "cache").hit
    assert len(cache_files(tmp_path / "cache")) == 2


def _run(base: Path, name: str, cache_dir: Path, workers: int = 0) -> Path:
    path = experiment(base, {"name": name, "train": {"epochs": 2},
                             "data": {"cache_dir": str(cache_dir), "num_workers": workers}})
    cwd = os.getcwd()
    os.chdir(base)
    try:
        run.run(config.load(path), progress=False)
    finally:
        os.chdir(cwd)
    return base / "runs" / name


def test_a_run_from_the_cache_is_bit_identical_to_one_that_built_it(tmp_path, monkeypatch):
    """The second run's copy of the data sits elsewhere: the cache is keyed by content, not place."""
    built = fingerprint(_run(make_data(tmp_path / "a"), "tiny", tmp_path / "cache"))
    refuse_decoding(monkeypatch)
    assert fingerprint(_run(make_data(tmp_path / "b"), "tiny", tmp_path / "cache", workers=2)) == built


def test_the_cache_folder_is_result_neutral():
    assert {"data.cache_dir", "data.decode_workers"} <= config.RESULT_NEUTRAL


def test_building_a_cache_leaves_the_process_thread_count_alone(tmp_path):
    """Pool workers decode in one thread each; the run's own process keeps its count, which its bits
    depend on (a cold build once left it at 1, and cold and warm runs differed in the last bits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        build(split_paths(make_split(tmp_path / "train", 2)), tmp_path / "cache")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(0, 3 * cache.HASH_CHUNK), missing=st.sets(st.integers(0, 3 * cache.HASH_CHUNK)), workers=st.integers(1, 3))
def test_hashing_gives_every_files_digest_in_order_across_chunks(tmp_path_factory, n, missing, workers):
    """Any number of files over any number of chunks and threads: each path's own size and SHA-256,
    in the paths' order, and an unreadable path's reason in its place."""
    folder = tmp_path_factory.mktemp("hashing")
    paths = []
    for i in range(n):
        path = folder / f"{i}.bin"
        if i not in missing:
            path.write_bytes(str(i).encode() * (i % 7 + 1))
        paths.append(str(path))
    found = cache.hash_files(paths, workers, progress=False, desc="hash")
    assert len(found) == n
    for i, (path, got) in enumerate(zip(paths, found)):
        if i in missing:
            assert isinstance(got, str) and path in got
        else:
            blob = Path(path).read_bytes()
            assert got == cache.Hashed(len(blob), hashlib.sha256(blob).hexdigest())
