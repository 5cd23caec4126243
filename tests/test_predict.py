"""imgcls.predict on hostile inputs: every bad file gets its own error line, the good ones are still
classified; decoding runs ahead of the model in order and within a bounded window."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from imgcls import decoding
from imgcls.errors import DataError

from .fixtures import bomb_png, cli, cli_env, image_array, train_tiny

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill
showpage
%%EOF
"""


def fake_ghostscript(folder: Path, marker: Path) -> Path:
    """A `gs` that records that it was started: PIL runs gs to render EPS files."""
    folder.mkdir()
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\necho started >> '{marker}'\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR)
    return folder


def hostile_folder(folder: Path) -> dict[str, str]:
    """Two good images beside six bad entries; for each bad one, words its error line must hold."""
    folder.mkdir()
    Image.fromarray(image_array(0, 1)).save(folder / "good_cat.png")
    Image.fromarray(image_array(1, 2)).save(folder / "good_dog.jpg", quality=95)
    bomb_png(folder / "bomb.png", 10_000)
    (folder / "vector.jpg").write_bytes(EPS)
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    (folder / "moving.png").write_bytes(gif.getvalue())
    os.mkfifo(folder / "pipe.jpg")
    (folder / "album.jpg").mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    return {
        "bomb.png": "too many pixels",
        "vector.jpg": "not an image in a supported format",
        "moving.png": "animated or multi-page image (3 frames)",
        "pipe.jpg": "a pipe, socket or device",
        "album.jpg": "a folder, not an image file",
        "empty.jpg": "empty file (0 bytes)",
    }


def test_the_eps_file_would_start_ghostscript_if_its_decoder_were_allowed(tmp_path, monkeypatch):
    """Checks the test's own EPS file: with PIL's EPS decoder it does run gs (the fake one)."""
    marker = tmp_path / "gs-started"
    monkeypatch.setenv("PATH", f"{fake_ghostscript(tmp_path / 'bin', marker)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    (tmp_path / "vector.jpg").write_bytes(EPS)
    with Image.open(tmp_path / "vector.jpg") as img:
        assert img.format == "EPS"
        with pytest.raises((OSError, subprocess.CalledProcessError)):  # the fake gs renders nothing
            img.load()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError, match="not an image in a supported format"):
        decoding.decode(str(tmp_path / "vector.jpg"), 16)
    assert not marker.exists()


@pytest.mark.slow
def test_predict_over_a_hostile_folder_classifies_the_good_and_names_each_bad(tmp_path):
    exp_path = train_tiny(tmp_path, {"train": {"epochs": 1}})
    expected = hostile_folder(tmp_path / "inbox")
    marker = tmp_path / "gs-started"
    path = f"{fake_ghostscript(tmp_path / 'bin', marker)}{os.pathsep}{os.environ['PATH']}"

    begun = time.monotonic()
    proc = cli("predict", str(exp_path), "runs/tiny/best.safetensors", "inbox", cwd=tmp_path, env=cli_env(PATH=path))
    out, err = proc.communicate(timeout=240)  # a blocking read of the pipe would never return
    status = proc.returncode

    assert status == 1, (out, err)
    assert "Traceback" not in err, err
    classified = sorted(line.split(":")[0] for line in out.splitlines())
    assert classified == [os.path.join("inbox", "good_cat.png"), os.path.join("inbox", "good_dog.jpg")], out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected), err
    for name, reason in expected.items():
        assert any(f"error: {os.path.join('inbox', name)}: " in line and reason in line for line in errors), (name, err)
    assert not marker.exists(), "Ghostscript was started"
    assert time.monotonic() - begun < 240


def test_decode_ahead_keeps_order_errors_and_its_window(monkeypatch):
    """The decoding thread yields each path's image or error in input order, and never runs more
    than `window` files ahead of what the model has taken (a large folder stays bounded in memory)."""
    from imgcls import predict

    started = []

    def fake_decode(path: str, resize_size: int):
        started.append(path)
        if path.startswith("bad"):
            raise DataError(f"{path}: unreadable")
        return path

    monkeypatch.setattr(decoding, "decode", fake_decode)
    paths = [f"{'bad' if i % 5 == 3 else 'ok'}{i}" for i in range(40)]
    window = 4
    seen = []
    for taken, (path, image) in enumerate(predict._decoded_ahead(paths, 8, window), start=1):
        time.sleep(0.002)  # let the thread run ahead as far as it may
        assert len(started) <= taken + window
        seen.append((path, str(image) if isinstance(image, DataError) else image))
    assert seen == [(p, f"{p}: unreadable" if p.startswith("bad") else p) for p in paths]
