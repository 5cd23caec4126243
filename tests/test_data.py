"""imgcls.data: the preflight scan finds junk, holes, corrupt files, odd colour modes, leaks and link
loops; every path decodes the same pixels; loader workers and the batched transform path do not
change a result."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from imgcls import augment, checkpoint, config, data, decoding, evaluate, models, predict, provenance, run, rundir
from imgcls.errors import DataError

from .fixtures import (
    CLASSES,
    blank_png,
    bomb_png,
    experiment,
    grey_tiff,
    image_array,
    make_cue_data,
    make_data,
    make_split,
    structured_image,
)


def data_cfg(base, **overrides) -> config.DataConfig:
    fields = {"train_dir": str(base / "data" / "train"), "val_dir": str(base / "data" / "val"), "image_size": 16}
    return config.DataConfig(**(fields | overrides))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- case 5


def test_hidden_folders_are_never_classes_and_junk_files_are_skipped_and_counted(tmp_path):
    make_data(tmp_path)
    train = tmp_path / "data" / "train"
    for junk_dir in (".ipynb_checkpoints", ".git", "__MACOSX"):
        make_split(train / junk_dir, 1)  # image files inside, still not a class
        make_split(train / "cat" / junk_dir, 1)  # nor part of one
    (train / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (train / "cat" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (train / "cat" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")
    (train / "dog" / "notes.txt").write_text("labelled by hand\n")
    (train / "dog" / "labels.csv").write_text("0.png,dog\n")

    found = data.prepare(data_cfg(tmp_path), progress=False)

    assert found.classes == list(CLASSES)
    assert len(found.splits["train"].paths) == 16
    assert not any("/." in p or "__MACOSX" in p for p in found.splits["train"].paths)
    assert found.report["splits"]["train"]["skipped_files"] == {"hidden or system file": 4, "not an image extension": 2}
    assert found.report["bad_images"] == []


def test_the_preflight_summary_is_printed_and_saved_in_the_run_directory(tmp_path, monkeypatch, capsys):
    make_data(tmp_path)
    (tmp_path / "data" / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "data" / "val" / "dog" / "readme.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert run.main([str(experiment(tmp_path, {"train": {"epochs": 1}})), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "train: 16 images, 1 non-image files skipped" in err and "val: 8 images, 1 non-image files skipped" in err
    saved = json.loads((tmp_path / "runs" / "tiny" / "preflight.json").read_text())
    assert saved["splits"]["train"]["skipped_files"] == {"hidden or system file": 1}
    assert saved["splits"]["val"]["per_class"] == {"cat": 4, "dog": 4}


# ----------------------------------------------------------------------------------- case 6


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_an_error_naming_class_and_split(tmp_path, split):
    make_data(tmp_path)
    folder = tmp_path / "data" / split / "dog"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"junk")  # junk alone does not make a class non-empty
    with pytest.raises(DataError, match=rf"class 'dog' of the {split} split holds no images"):
        data.prepare(data_cfg(tmp_path), progress=False)


# ----------------------------------------------------------------------------------- case 7


def test_a_class_missing_from_train_is_an_error(tmp_path):
    make_data(tmp_path)
    make_split(tmp_path / "data" / "val", 2, classes=("cat", "dog", "fox"), offset=100)
    with pytest.raises(DataError, match=r"\['fox'\] are not in the training set's classes"):
        data.prepare(data_cfg(tmp_path), progress=False)


def test_a_class_missing_from_val_is_a_warning_and_labels_follow_train(tmp_path):
    make_split(tmp_path / "data" / "train", 2, classes=("ant", "bee", "cow"))
    make_split(tmp_path / "data" / "val", 2, classes=("ant", "cow"), offset=100)
    found = data.prepare(data_cfg(tmp_path), progress=False)
    assert found.report["warnings"] == ["val split has no images of class(es) ['bee']"]
    val = found.splits["val"]
    labels = {os.path.basename(os.path.dirname(p)): label for p, label in zip(val.paths, val.labels)}
    assert labels == {"ant": 0, "cow": 2}  # train's mapping, not val's own 0, 1


# ----------------------------------------------------------------------------------- case 8


def corrupt_files(folder) -> dict[str, str]:
    """The four kinds of bad file, each with the words its reason must contain."""
    jpeg = io.BytesIO()
    Image.fromarray(image_array(0, 7, 64)).save(jpeg, "JPEG")
    whole_png = png_bytes(image_array(0, 8, 64))
    files = {
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "unreadable image"),
        "truncated.png": (whole_png[: len(whole_png) // 2], "unreadable image"),
        "empty.png": (b"", "empty file"),
        "page.png": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: reason for name, (_, reason) in files.items()}


def test_corrupt_files_are_all_listed_with_reasons_before_training(tmp_path, monkeypatch, capsys):
    make_data(tmp_path)
    reasons = corrupt_files(tmp_path / "data" / "train" / "cat")
    with pytest.raises(DataError) as info:
        data.prepare(data_cfg(tmp_path), progress=False)
    message = str(info.value)
    assert message.startswith("4 unreadable image(s)") and 'data.on_bad_image = "skip"' in message
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4
    for name, reason in reasons.items():
        assert any(name in line and reason in line for line in lines), (name, lines)

    monkeypatch.chdir(tmp_path)  # through the command: exit 2, and no epoch ran
    assert run.main([str(experiment(tmp_path)), "--quiet"]) == 2
    assert "4 unreadable image(s)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "last.safetensors").exists()


def test_on_bad_image_skip_leaves_them_out_and_lists_them(tmp_path):
    make_data(tmp_path)
    reasons = corrupt_files(tmp_path / "data" / "train" / "cat")
    found = data.prepare(data_cfg(tmp_path, on_bad_image="skip"), progress=False)
    assert len(found.report["bad_images"]) == 4
    for name, reason in reasons.items():
        assert any(name in b and reason in b for b in found.report["bad_images"])
    train = found.splits["train"]
    assert len(train.paths) == len(train.labels) == len(found.images["train"]) == 16
    assert not any(os.path.basename(p) in reasons for p in train.paths)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_refused_or_complete_never_half_grey(tmp_path, fmt):
    """Cut a file at 40 places: each cut is refused, or (a PNG missing only its end marker) decodes to
    exactly the whole file's pixels; never a partly grey image."""
    buf = io.BytesIO()
    Image.fromarray(image_array(1, 3, 48)).save(buf, fmt, **({"progressive": True} if fmt == "JPEG" else {}))
    whole = buf.getvalue()
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(whole)
    reference = decoding.decode(str(path), 48)
    refused = 0
    for cut in sorted(set(np.linspace(1, len(whole) - 1, 40).astype(int))):
        path.write_bytes(whole[:cut])
        try:
            image = decoding.decode(str(path), 48)
        except DataError:
            refused += 1
            continue
        assert torch.equal(image, reference), f"cut at {cut} of {len(whole)} bytes loaded different pixels"
    assert refused >= 38


# ----------------------------------------------------------------------------------- case 9


def colour_mode_images(folder) -> dict[str, tuple[int, int, int]]:
    """One 8x8 file per colour mode, and the RGB every pixel must decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def save(name, img, rgb, **kw):
        img.save(folder / name, **kw)
        expected[name] = rgb

    save("cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 0, 0)), (255, 0, 255), quality=100)  # magenta
    save("grey.png", Image.new("L", (8, 8), 77), (77, 77, 77))
    save("grey_alpha.png", Image.new("LA", (8, 8), (40, 0)), decoding.BACKGROUND)  # fully transparent
    save("rgba.png", Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (255, 127, 127))  # half red on white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    save("palette.png", palette, decoding.BACKGROUND, transparency=1)  # index 1 (red) is transparent
    save("one_bit.png", Image.new("1", (8, 8), 1), (255, 255, 255))
    sixteen = np.full((8, 8), 0xC8FF, dtype=np.uint16)  # 51455 of 65535: level 200 of 255, not clipped at 255
    save("sixteen_bit.png", Image.fromarray(sixteen), (200, 200, 200))
    return expected


def test_every_colour_mode_becomes_the_right_three_channels(tmp_path):
    expected = colour_mode_images(tmp_path)
    with Image.open(tmp_path / "sixteen_bit.png") as img:
        assert img.mode == "I;16"
    for name, rgb in expected.items():
        image = decoding.decode(str(tmp_path / name), 8)
        assert image.shape == (3, 8, 8) and image.dtype == torch.uint8, name
        got = image.reshape(3, -1)
        assert (got - torch.tensor(rgb).view(3, 1)).abs().max() <= 2, (name, got[:, 0].tolist(), rgb)


def exif_rotated_jpeg(path) -> None:
    """A 24x12 JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    once upright it is 12 wide and 24 high, red on top and blue at the bottom."""
    upright = np.zeros((24, 12, 3), dtype=np.uint8)
    upright[:12] = (255, 0, 0)
    upright[12:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", exif=exif, quality=100)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    exif_rotated_jpeg(tmp_path / "sideways.jpg")
    image = decoding.decode(str(tmp_path / "sideways.jpg"), 12)
    assert image.shape == (3, 24, 12)
    top, bottom = image[:, 2, 6].tolist(), image[:, 21, 6].tolist()
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


def test_a_camera_multi_picture_jpeg_is_its_first_picture(tmp_path):
    first, preview = Image.new("RGB", (16, 8), (200, 10, 10)), Image.new("RGB", (16, 8), (0, 0, 255))
    first.save(tmp_path / "mpo.jpg", format="MPO", save_all=True, append_images=[preview])
    image = decoding.decode(str(tmp_path / "mpo.jpg"), 8)
    assert (image.reshape(3, -1).float().mean(1) - torch.tensor([200.0, 10, 10])).abs().max() < 8


def test_training_evaluate_and_predict_see_the_same_pixels(tmp_path, monkeypatch, capsys):
    """The uint8 images the model receives in training, in evaluate and in predict are all the
    centre crop of decoding.decode's output (recovered exactly from the normalised input)."""
    make_data(tmp_path)
    modes = colour_mode_images(tmp_path / "modes")
    exif_rotated_jpeg(tmp_path / "modes" / "sideways.jpg")
    names = sorted(os.listdir(tmp_path / "modes"))
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / "data" / split / "cat")
        shutil.copytree(tmp_path / "modes", tmp_path / "data" / split / "cat")
    exp_path = experiment(tmp_path, {"augment": [], "train": {"epochs": 1, "channels_last": False},
                                     "data": {"normalize": "half", "image_size": 8, "resize_size": 8}, "model": {"channels": [8]}})
    crop = augment.eval_transform(8)
    expected = [crop(decoding.decode(str(tmp_path / "modes" / n), 8)).numpy().tobytes() for n in names]
    assert len(modes) + 1 == len(names)

    seen: list[bytes] = []

    def record(module, args):
        if isinstance(module, models.Classifier):  # the model's input: the normalised batch
            pixels = ((args[0].detach().float() * 0.5 + 0.5) * 255).round().to(torch.uint8)
            seen.extend(t.contiguous().numpy().tobytes() for t in pixels)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        monkeypatch.chdir(tmp_path)
        assert run.main([str(exp_path), "--quiet"]) == 0
        trained = Counter(seen[:16])  # epoch 1 sees 8 + 8 images first (then validation)
        ckpt = str(tmp_path / "runs" / "tiny" / "best.safetensors")
        seen.clear()
        assert evaluate.main([str(exp_path), ckpt]) == 0
        evaluated = seen[: len(names)]  # val in folder order: cat (the colour modes) first
        seen.clear()
        assert predict.main([str(exp_path), ckpt, str(tmp_path / "modes")]) == 0
        predicted = list(seen)
    finally:
        handle.remove()
    capsys.readouterr()
    assert evaluated == expected and predicted == expected
    assert not Counter(expected) - trained, "training saw other pixels for some colour mode"


# ---------------------------------------------------------------------------------- case 10


@pytest.mark.parametrize("policy", ["warn", "fail"])
def test_files_shared_between_train_and_val_are_reported_as_leakage(tmp_path, policy):
    make_data(tmp_path)
    train_file = tmp_path / "data" / "train" / "dog" / "3.png"
    shutil.copy(train_file, tmp_path / "data" / "val" / "dog" / "copy.png")
    cfg = data_cfg(tmp_path, leakage=policy)
    if policy == "fail":
        with pytest.raises(DataError, match=r"1 file\(s\) in train are byte-identical") as info:
            data.prepare(cfg, progress=False)
        assert f"{train_file} == {tmp_path / 'data' / 'val' / 'dog' / 'copy.png'}" in str(info.value)
    else:
        found = data.prepare(cfg, progress=False)
        assert found.report["leakage"] == [(str(train_file), str(tmp_path / "data" / "val" / "dog" / "copy.png"))]
        assert any("byte-identical" in w for w in found.report["warnings"])


def test_no_leakage_is_reported_for_distinct_files(tmp_path):
    make_data(tmp_path)
    found = data.prepare(data_cfg(tmp_path, leakage="fail"), progress=False)
    assert found.report["leakage"] == [] and found.report["warnings"] == []


# ---------------------------------------------------------------------------------- case 11


def test_link_loops_and_links_out_of_the_folder_neither_hang_nor_duplicate(tmp_path):
    make_data(tmp_path)
    cat = tmp_path / "data" / "train" / "cat"
    (cat / "sub").mkdir()
    Image.fromarray(image_array(0, 50)).save(cat / "sub" / "deep.png")
    os.symlink(cat, cat / "sub" / "loop")  # cat/sub/loop -> cat: a cycle
    os.symlink(cat / "sub", cat / "again")  # a second way into cat/sub
    os.symlink(tmp_path / "data" / "train" / "dog", cat / "dogs")  # into another class
    outside = make_split(tmp_path / "elsewhere", 3)
    os.symlink(outside, cat / "out")  # out of the data folder
    os.symlink(cat / "0.png", cat / "0_link.png")  # the same file twice

    found = data.prepare(data_cfg(tmp_path), progress=False)
    train = found.splits["train"]
    real = [os.path.realpath(p) for p in train.paths]
    assert len(real) == len(set(real)) == 17  # 16 images and deep.png, each once
    assert sum(label == 0 for label in train.labels) == 9
    assert all(os.path.realpath(p).startswith(str(tmp_path / "data" / "train")) for p in train.paths)
    assert found.report["splits"]["train"]["skipped_files"] == {
        "linked folder seen before (a link loop or a second link)": 2,
        "linked folder outside the class folder": 2,
        "duplicate link to the same file": 1,
    }


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch):
    """Memory stays bounded: the size in the header is refused before any pixel is decoded."""
    bomb_png(tmp_path / "bomb.png", 10_000)  # 100 Mpixel: above PIL's warning limit, below its hard limit
    assert os.path.getsize(tmp_path / "bomb.png") < 1_000_000

    def no_decoding(self):
        raise AssertionError("the bomb's pixels were being decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DataError, match="too many pixels"):
        decoding.decode(str(tmp_path / "bomb.png"), 16)


def test_animated_images_folders_named_like_images_and_broken_links_are_bad_files(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "moving.png", "GIF", save_all=True, append_images=frames[1:])  # a GIF named .png
    (tmp_path / "album.jpg").mkdir()
    Image.fromarray(image_array(0, 1)).save(tmp_path / "album.jpg" / "inside.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    listed = data.image_files(str(tmp_path), Counter())
    assert [os.path.basename(p) for p in listed] == ["album.jpg", "dangling.png", "moving.png"]  # not entered
    reasons = {"album.jpg": "a folder, not an image file", "dangling.png": "broken symbolic link",
               "moving.png": "animated or multi-page image (2 frames)"}
    for path in listed:
        with pytest.raises(DataError, match=re.escape(f"{path}: {reasons[os.path.basename(path)]}")):
            decoding.decode(path, 16)


# ------------------------------------------------------- images under extensions imgcls does not read

stems = st.text(st.characters(whitelist_categories=["Ll", "Lu", "Nd"], max_codepoint=127), min_size=1, max_size=8)
unlisted_extensions = st.one_of(
    st.sampled_from([".jfif", ".JPG2", ".heic", ".jpe", ".avif", ".png~", ""]),
    st.from_regex(r"\.[A-Za-z0-9]{1,5}", fullmatch=True),
).filter(lambda ext: not ext.lower().endswith(data.IMAGE_EXTENSIONS))


@given(files=st.lists(st.tuples(stems, unlisted_extensions), min_size=1, max_size=6, unique=True),
       listed=st.sampled_from([None, *data.IMAGE_EXTENSIONS, ".JPG", ".Png"]))
@example(files=[("photo", ".jfif"), ("scan", ".JPG2"), ("IMG_0001", ".heic"), ("noext", "")], listed=None)
def test_a_class_of_images_under_unread_extensions_is_reported_with_what_was_skipped(tmp_path_factory, files, listed):
    """A class folder whose files all have extensions imgcls does not read is an error saying how many
    files of which extensions were skipped and which are read, in the preflight and in predict; one
    file with a listed extension (in any case) makes the class readable."""
    base = tmp_path_factory.mktemp("ext")
    folder = base / "train" / "cat"
    folder.mkdir(parents=True)
    blob = png_bytes(image_array(0, 1))
    for stem, ext in files:
        (folder / f"{stem}{ext}").write_bytes(blob)
    if listed is not None:
        (folder / f"kept{listed}").write_bytes(blob)
        assert data.scan_split("train", str(base / "train"), ["cat"]).paths == [str(folder / f"kept{listed}")]
        assert predict.expand([str(folder)])[1] == []
        return
    with pytest.raises(DataError) as info:
        data.scan_split("train", str(base / "train"), ["cat"])
    message = str(info.value)
    counts = Counter(ext or "no extension" for _, ext in files)
    assert message.startswith(f"{folder}: class 'cat' of the train split holds no images, only {len(files)} file(s)")
    for ext, n in counts.items():
        assert f"{n} {ext}" in message, (ext, message)
    assert " ".join(data.IMAGE_EXTENSIONS) in message
    paths, errors = predict.expand([str(folder)])
    assert paths == [] and errors == [f"{folder}: a folder holding no images" + message.split("holds no images", 1)[1]]


# ------------------------------------------------------- memory bounded by the configuration


class PixelsDecoded(Exception):
    """Raised by a stand-in for PIL's load: the pixels of a file that should have been refused were read."""


@given(short=st.integers(1, 64), long=st.integers(1, 70_000), wide=st.booleans(), resize_size=st.integers(8, 300))
@example(short=1, long=60_000, wide=False, resize_size=256)  # the 258-byte PNG that cost 8.4 GB
@example(short=1, long=10, wide=True, resize_size=8)  # exactly MAX_ASPECT: kept
@example(short=2, long=21, wide=True, resize_size=8)  # 80 x 8 after resizing: kept
@example(short=2, long=23, wide=True, resize_size=8)  # 92 x 8: refused
def test_a_decoded_image_fits_the_bound_of_its_experiment_or_is_refused_before_its_pixels_are_read(
    tmp_path_factory, short, long, wide, resize_size
):
    """Decoding resizes the shorter side to resize_size, so the cached image may hold at most
    MAX_ASPECT * resize_size**2 pixels: a tiny file of extreme shape is refused from its header."""
    path = str(tmp_path_factory.mktemp("shape") / "image.png")
    width, height = (long, short) if wide else (short, long)
    blank_png(path, width, height)
    bound = decoding.MAX_ASPECT * resize_size**2
    new_h, new_w = decoding.resized_shape(height, width, resize_size)
    if new_h * new_w > bound:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(PixelsDecoded()))
            with pytest.raises(DataError, match=re.escape(f"{path}: refused, {width}x{height} pixels is longer than")):
                decoding.decode(path, resize_size)
    else:
        image = decoding.decode(path, resize_size)
        assert image.shape == (3, new_h, new_w) and min(new_h, new_w) == resize_size
        assert image.numel() <= 3 * bound


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_image_past_the_memory_bound_is_a_bad_image_of_the_preflight(tmp_path, policy):
    """Refused like any unreadable file: listed with its reason, then the run stops or leaves it out."""
    make_data(tmp_path)
    strip = tmp_path / "data" / "train" / "cat" / "strip.png"
    blank_png(strip, 60_000, 1)  # a few hundred bytes; 18 x 1.1 million pixels once resized
    cfg = data_cfg(tmp_path, on_bad_image=policy)
    if policy == "fail":
        with pytest.raises(DataError, match=re.escape(f"{strip}: refused, 60000x1 pixels is longer than 10:1")):
            data.prepare(cfg, progress=False)
        return
    found = data.prepare(cfg, progress=False)
    assert str(strip) not in found.splits["train"].paths and len(found.splits["train"].paths) == 16
    assert [b.split(":")[0] for b in found.report["bad_images"]] == [str(strip)]


def test_a_100_megapixel_camera_jpeg_decodes_cheaply_at_reduced_scale(tmp_path):
    """PIL's decompression-bomb guard counts the header's pixels; a JPEG is counted after draft
    mode has shrunk it (1/8 here), so a large photo is neither refused nor decoded at full size."""
    Image.new("L", (11648, 8736), 90).save(tmp_path / "camera.jpg", quality=30)  # 101.8 megapixels
    decoded_sizes = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded_sizes.append(self.size)
        return load(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile.ImageFile, "load", recording_load)
        image = decoding.decode(str(tmp_path / "camera.jpg"), 64)
    assert image.shape == (3, 64, 85) and abs(int(image[0, 32, 42]) - 90) <= 2
    assert set(decoded_sizes) == {(1456, 1092)}  # 1/8 of each side: 1.6 megapixels decoded, not 102


# ------------------------------------------------------------- 32-bit integer and float greyscale


def expected_levels(values: np.ndarray) -> np.ndarray | None:
    """The documented rule, restated: None where the file must be refused."""
    v = values.astype(np.float64)
    if not np.isfinite(v).all() or v.min() < 0:
        return None
    high = v.max()
    if values.dtype.kind == "f" and high <= 1:
        return np.rint(v * 255)
    if high <= 255:
        return np.rint(v)
    if high <= 65535:
        return np.floor(v / 256)
    return np.rint(v * 255 / high)


def greyscale_arrays():
    """8 x (8..12) arrays of 32-bit unsigned, signed and float values over every range the rule tells apart."""
    shapes = st.tuples(st.just(8), st.integers(8, 12))
    bands = {
        np.uint32: [st.integers(0, 255), st.integers(0, 65535), st.integers(0, 2**32 - 1)],
        np.int32: [st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)],
        np.float32: [st.floats(0, 1, width=32), st.floats(0, 255, width=32), st.floats(0, 65535, width=32),
                     st.floats(-10, 1e9, width=32), st.floats(width=32)],  # the last one: NaN and infinities too
    }
    return st.one_of([hnp.arrays(dtype, shapes, elements=band) for dtype, each in bands.items() for band in each])


@given(values=greyscale_arrays())
@example(values=np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1)))  # a float image in [0, 1]: was black
@example(values=np.tile(np.linspace(0, 4e9, 8).astype(np.uint32), (8, 1)))  # up to 4e9: was saturated
@example(values=np.full((8, 8), 200, dtype=np.int32))  # 8-bit levels in a 32-bit file: was black
def test_32_bit_and_float_greyscale_is_mapped_by_its_range_or_refused(tmp_path_factory, values):
    """A TIFF of mode "I" or "F" becomes 8-bit levels by the documented rule (`decoding.levels`), or is
    refused naming the file; never clipped into black or white."""
    path = str(tmp_path_factory.mktemp("grey") / "image.tif")
    grey_tiff(path, values)
    expected = expected_levels(values)
    if expected is None:
        with pytest.raises(DataError, match=re.escape(path) + ".*(negative|NaN or infinite)"):
            decoding.decode(path, 8)
        return
    image = decoding.decode(path, 8)
    assert image.shape == (3, *values.shape)
    assert torch.equal(image[0], image[2])
    assert np.abs(image[0].numpy().astype(np.int64) - expected).max() <= 1, (values, image[0])


# ------------------------------------------------------------- loader workers and the keyed ops


def _run(tmp_path, name: str, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    exp = {
        "name": name,
        "device": "cpu",
        "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"), "image_size": 32,
                 "batch_size": 4, "eval_batch_size": 8},
        "augment": [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "horizontal_flip"}],
        "model": {"arch": "scratch_cnn", "channels": [4, 8], "hidden": 8, "batch_norm": True},
        "train": {"epochs": 2},
        "output": {"root": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            exp[section] = {**exp.get(section, {}), field: value}
        else:
            exp[section] = value
    results = run.run(config.validate(exp), progress=False)
    return results, checkpoint.load(tmp_path / "runs" / name / rundir.LAST).model


PER_IMAGE = [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "color_jitter", "brightness": 0.2}]
BATCHED = [{"op": "random_crop", "padding": 4, "padding_mode": "reflect"}, {"op": "horizontal_flip"}]
KEYED = [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "horizontal_flip"}]


def _workers_agree(tmp_path, augment: list) -> None:
    serial, serial_weights = _run(tmp_path, "w0", data__num_workers=0, augment=augment)
    parallel, parallel_weights = _run(tmp_path, "w2", data__num_workers=2, augment=augment)
    assert serial_weights.keys() == parallel_weights.keys()
    for key in serial_weights:
        assert torch.equal(serial_weights[key], parallel_weights[key]), key
    assert serial["val"]["loss"] == parallel["val"]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("ops, keyed", [(PER_IMAGE, False), (BATCHED, True)], ids=["transforms_v2", "keyed"])
def test_num_workers_do_not_change_bits(tmp_path, ops, keyed):
    """Each sample's augmentation is drawn from (seed, epoch, index): who loads it cannot matter,
    with transforms v2 and with the keyed ops alike."""
    make_cue_data(tmp_path)
    exp = config.validate({"name": "x", "data": {"train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val"),
                           "image_size": 32}, "augment": ops, "model": {"arch": "scratch_cnn"}})
    transform = data.build_loaders(exp, data.prepare(exp.data, progress=False))["train"].dataset.transform
    assert isinstance(transform, augment.BatchAugment) == keyed
    _workers_agree(tmp_path, ops)


@pytest.mark.slow
def test_workers_check_catches_batched_draws_from_the_process_rng(tmp_path, monkeypatch):
    """Broken variant: the keyed ops' draws taken from the loading process's RNG, which each
    worker seeds differently."""
    make_cue_data(tmp_path)
    monkeypatch.setattr(augment, "sample_uniforms", lambda seed, epoch, indices, streams: torch.rand(len(streams), len(indices), dtype=torch.float64))
    with pytest.raises(AssertionError):
        _workers_agree(tmp_path, BATCHED)


def test_the_ops_alone_decide_the_path_and_sizes_only_how_a_batch_is_cut():
    """Crops and flips take imgcls's keyed ops whatever the images' sizes; a batch of mixed sizes is
    augmented image by image, with the pixels each image gets in a batch of its own size."""
    flip, jitter = config.HorizontalFlip(op="horizontal_flip"), config.ColorJitter(op="color_jitter", brightness=0.2)
    crop = config.RandomCrop(op="random_crop", padding=3)
    assert isinstance(augment.split_transform([flip], 32), augment.BatchAugment)
    assert isinstance(augment.split_transform([], 32), augment.BatchAugment)
    assert not isinstance(augment.split_transform([flip, jitter], 32), augment.BatchAugment)
    rng = np.random.default_rng(0)
    shapes = [(40, 48), (40, 48), (48, 40), (33, 60)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, *s), dtype=np.uint8)) for s in shapes]
    split = data.Split("train", "/", [f"{i}.png" for i in range(4)], [0, 1, 0, 1])
    items = data.ImageSet(split, images, augment.split_transform([crop, flip], 32), seed=5)
    keys = [(2, i) for i in range(4)]
    mixed, labels = items.__getitems__(keys)
    same_size, _ = items.__getitems__(keys[:2])  # these two share a size
    for image, label, key in zip(mixed, labels, keys):
        alone, alone_label = items[key]
        assert torch.equal(image, alone) and label == alone_label
    assert all(torch.equal(a, b) for a, b in zip(same_size, mixed[:2]))
    assert not torch.equal(mixed[0], mixed[1])


# ------------------------------------------------------------------- training that trains nothing


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    counts=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=3),
    batch_size=st.integers(2, 6),
)
@example(counts=[(1, 0), (0, 0)], batch_size=2)  # a class folder with no files
@example(counts=[(2, 0), (0, 1)], batch_size=2)  # a class whose only file is unreadable
@example(counts=[(4, 0)], batch_size=2)  # one class
def test_a_run_that_would_train_nothing_is_refused_before_training(tmp_path_factory, counts, batch_size):
    """Per class (readable, unreadable) files; unreadable ones are skipped. A run trains at least one
    optimizer step per epoch on two or more classes that all have images, or it is refused before
    any checkpoint exists, saying why."""
    base = tmp_path_factory.mktemp("nothing")
    classes = [f"c{i}" for i in range(len(counts))]
    for i, (good, bad) in enumerate(counts):
        folder = base / "data" / "train" / classes[i]
        folder.mkdir(parents=True)
        for j in range(good):
            Image.fromarray(image_array(i, j)).save(folder / f"{j}.png")
        for j in range(bad):
            (folder / f"bad{j}.png").write_bytes(b"not a png")
    make_split(base / "data" / "val", 1, classes=classes[:1])
    exp = config.load(experiment(base, {"data": {"batch_size": batch_size, "train_dir": str(base / "data/train"),
                                                 "val_dir": str(base / "data/val"), "on_bad_image": "skip"},
                                        "train": {"epochs": 1}, "output": {"root": str(base / "runs")}}))
    readable = [good for good, _ in counts]
    trainable = len(counts) >= 2 and all(readable) and sum(readable) // batch_size + (sum(readable) % batch_size > 1) > 0
    if trainable:
        run.run(exp, progress=False)
        assert (base / "runs" / "tiny" / "metrics.json").exists()
        return
    with pytest.raises(DataError, match="no optimizer step|at least two classes|no training images|holds no images|no readable images"):
        run.run(exp, progress=False)
    assert not (base / "runs" / "tiny" / rundir.LAST).exists()


def test_a_batch_size_of_one_is_refused_by_the_schema_with_the_reason():
    """batch_size = 1 used to run every epoch with zero optimizer steps (each batch of one is dropped)."""
    with pytest.raises(config.ConfigError, match=r"data.batch_size: Input should be greater than or equal to 2"):
        config.validate({"name": "x", "data": {"train_dir": "a", "val_dir": "b", "batch_size": 1}, "model": {"arch": "scratch_cnn"}})
    assert "a batch of one is dropped" in config.DataConfig.model_fields["batch_size"].description


# ----------------------------------------------------------------- copies that are not byte-identical


def photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(structured_image(seed, 96, 128)).save(path)
    return path


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.floats(0.6, 1.8), quality=st.integers(70, 95), which=st.integers(0, 3))
def test_resized_jpeg_copies_across_splits_and_photos_under_two_classes_are_reported(tmp_path_factory, scale, quality, which):
    """Sixteen distinct photos (fixed seeds, checked to be far apart) plus a resized, re-encoded copy
    of a training photo in val (leakage) and a training photo filed again under another class
    (a conflict): exactly those two are reported, nothing else."""
    root = tmp_path_factory.mktemp("copies")
    train = [photo(root / "train" / c / f"{i}.png", 10 * k + i) for k, c in enumerate("ab") for i in range(4)]
    for k, c in enumerate("ab"):
        for i in range(4):
            photo(root / "val" / c / f"{i}.png", 100 + 10 * k + i)
    original = Image.open(train[which])
    size = (round(original.width * scale), round(original.height * scale))
    copy = root / "val" / "a" / "copy.jpg"
    original.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(copy, quality=quality)
    conflict = root / "train" / "b" / "again.png"
    shutil.copy(train[(which + 1) % 4], conflict)
    cfg = config.DataConfig(train_dir=str(root / "train"), val_dir=str(root / "val"), image_size=64)
    found = data.prepare(cfg, progress=False).report
    near, conflicts = found["near_duplicates"], found["label_conflicts"]
    assert [(p["train"], p["other"]) for p in near["listed"]] == [(str(train[which]), str(copy))]
    assert (near["pairs"], near["images"]) == (1, 1)
    assert [(p["a"], p["class_a"], p["b"], p["class_b"]) for p in conflicts["listed"]] == [
        (str(train[(which + 1) % 4]), "a", str(conflict), "b")
    ]
    assert (conflicts["pairs"], conflicts["images"]) == (1, 2)
    assert any("1 image(s) in val/test look like resized or re-encoded copies" in w for w in found["warnings"])
    with pytest.raises(DataError, match="1 pair\\(s\\) of files under two classes look like one photo \\(2 files\\)"):
        data.prepare(cfg.model_copy(update={"label_conflicts": "fail"}), progress=False)


@st.composite
def hashed_splits(draw: st.DrawFn) -> dict[str, data.Split]:
    """train/val/test of a few images each: perceptual hashes a few bit flips from two bases (so
    many pairs fall within the threshold), labels of two classes, and some files byte-identical."""
    bases = draw(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=2))
    flips = st.lists(st.integers(0, 63), max_size=6).map(lambda f: sum(1 << k for k in set(f)))
    splits = {}
    for name in ("train", "val", "test"):
        n = draw(st.integers(1 if name == "train" else 0, 8))
        phashes = [draw(st.sampled_from(bases)) ^ draw(flips) for _ in range(n)]
        shas = [draw(st.sampled_from(["same", f"{name}{k}"])) for k in range(n)]
        labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        splits[name] = data.Split(name, name, [f"{name}/{k}.png" for k in range(n)], labels, sha256=shas, phashes=phashes)
    return splits


@given(splits=hashed_splits(), listed=st.integers(1, 5))
def test_near_duplicate_findings_count_every_pair_and_list_the_closest(splits, listed):
    """Against a brute force over every pair: the counts of pairs and of images in them, and the
    listed pairs: the `listed` closest, by bits, then split, then file order."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "LISTED_PAIRS", listed)
        leaks, conflicts = data._near_duplicates(splits, ["a", "b"])
    train, near = splits["train"], []
    for k, (name, split) in enumerate(splits.items()):
        for i, x in enumerate(train.phashes):
            for j, y in enumerate(split.phashes):
                bits = bin(x ^ y).count("1")
                if bits <= provenance.NEAR_DUPLICATE_BITS and (name != "train" or i < j):
                    near.append((bits, k, i, j, name, train.labels[i] != split.labels[j], train.sha256[i] == split.sha256[j]))
    want_leaks = sorted(p for p in near if p[4] != "train" and not p[5] and not p[6])
    want_conflicts = sorted(p for p in near if p[5])
    assert (leaks["pairs"], leaks["images"]) == (len(want_leaks), len({(p[4], p[3]) for p in want_leaks}))
    files = {("train", p[2]) for p in want_conflicts} | {(p[4], p[3]) for p in want_conflicts}
    assert (conflicts["pairs"], conflicts["images"]) == (len(want_conflicts), len(files))
    assert [(p["train"], p["other"], p["bits"]) for p in leaks["listed"]] == [
        (f"train/{i}.png", f"{name}/{j}.png", bits) for bits, _, i, j, name, *_ in want_leaks[:listed]]
    assert [(p["a"], p["b"], p["bits"]) for p in conflicts["listed"]] == [
        (f"train/{i}.png", f"{name}/{j}.png", bits) for bits, _, i, j, name, *_ in want_conflicts[:listed]]


def test_alike_images_are_counted_listed_closest_first_and_said_to_be_alike(tmp_path, monkeypatch):
    """Forty training images that hash alike, and twenty in val: 400 pairs of 20 val images, 800 pairs
    under two classes, of which preflight.json lists the LISTED_PAIRS closest, and the warnings say
    the hash cannot tell these images apart."""
    for split, n in (("train", 40), ("val", 20)):
        for k in range(n):
            path = tmp_path / split / ("a" if k % 2 else "b") / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.zeros((28, 28, 3), np.uint8)
            pixels[6:22, 8:20] = (200 if split == "train" else 150) + k  # one silhouette on black, shades apart
            Image.fromarray(pixels).save(path)
    cfg = config.DataConfig(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), image_size=28, resize_size=28,
                            cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(data, "LISTED_PAIRS", 50)
    found = data.prepare(cfg, progress=False).report
    near, conflicts = found["near_duplicates"], found["label_conflicts"]
    assert (near["pairs"], near["images"]) == (400, 20)  # val images with the training images of their class
    assert (conflicts["pairs"], conflicts["images"]) == (20 * 20 + 20 * 20, 60)  # within train, and train x val
    assert len(near["listed"]) == len(conflicts["listed"]) == 50
    assert [p["bits"] for p in conflicts["listed"]] == sorted(p["bits"] for p in conflicts["listed"])
    assert any(w.startswith("20 image(s) in val/test") and "tells these images apart poorly" in w for w in found["warnings"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_the_batched_form_trains_the_bits_of_the_per_image_form(tmp_path, monkeypatch, workers):
    """The keyed ops' batched form (picked for training on a GPU) run here on the CPU, through the
    loader (and its workers) and Normalize: the same weights, bit for bit, as the per-image form."""
    make_cue_data(tmp_path)
    per_image, per_image_weights = _run(tmp_path, f"per_image_{workers}", augment=KEYED + BATCHED)
    monkeypatch.setattr(data, "batched_form", lambda transform, device, is_train: is_train)
    batched, batched_weights = _run(tmp_path, f"batched_{workers}", augment=KEYED + BATCHED, data__num_workers=workers)
    preflight = json.loads((tmp_path / "runs" / f"batched_{workers}" / "preflight.json").read_text())
    assert preflight["transforms"]["train"] == "keyed ops, batched on the device"
    for key in per_image_weights:
        assert torch.equal(per_image_weights[key], batched_weights[key]), key
    assert per_image["val"]["loss"] == batched["val"]["loss"]
