"""What the tests are made of: generated image folders, experiment files and small run helpers.

No test needs downloaded data. Three image generators, each for its own kind of test:
- `make_split` / `make_data`: two classes (cat, dog) of noisy 20x20 PNGs, told apart by one
  saturated colour channel; the tiny experiment `TINY` trains on them in seconds.
- `make_shapes` / `make_shapes_data`: three classes of coloured shapes (circle, square, triangle)
  at any size, alternating PNG and JPEG; the end-to-end run (`shapes_overrides`) learns them.
- `make_cue_data`: three classes of 40x48 noise with one dimmed colour channel, for the speed
  knobs (loader workers, the feature cache) that must not change a result.

One experiment builder, `experiment(base, overrides)`, writes `TINY` deep-merged with overrides.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ noisy two-class images

CLASSES = ("cat", "dog")


def image_array(label: int, index: int, size: int = 20) -> np.ndarray:
    """A noisy image whose class shows in one colour channel, so a tiny CNN can learn it."""
    rng = np.random.default_rng(1000 * label + index)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    a[..., label % 3] = 200
    return a


def make_split(root: Path, per_class: int, classes=CLASSES, offset: int = 0) -> Path:
    """root/<class>/<i>.png of noisy images (see `image_array`)."""
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(image_array(label, offset + i)).save(folder / f"{i}.png")
    return root


def make_data(base: Path, train: int = 8, val: int = 4, classes=CLASSES) -> Path:
    """base/data/train and base/data/val of noisy images: the folders `TINY` names."""
    make_split(base / "data" / "train", train, classes)
    make_split(base / "data" / "val", val, classes, offset=100)
    return base


# ------------------------------------------------------------------ three-class shapes

# Each class is a shape in a colour; a small CNN separates them within a few epochs.
SHAPES = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 60, 220)}


def shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in SHAPES[kind])
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_shapes(root: Path, per_class: int, size: int, seed: int, classes=tuple(SHAPES)) -> Path:
    """root/<class>/<i>.png|jpg, alternating PNG and JPEG so both decoders are exercised."""
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = shape_image(kind, size, rng)
            if i % 2:
                img.save(root / kind / f"{i:03d}.jpg", quality=95)
            else:
                img.save(root / kind / f"{i:03d}.png")
    return root


def make_shapes_data(base: Path) -> Path:
    """base/data/{train,val,test} of the three shapes at 40x40 pixels (12, 4 and 4 per class); returns base/data."""
    make_shapes(base / "data" / "train", per_class=12, size=40, seed=1)
    make_shapes(base / "data" / "val", per_class=4, size=40, seed=2)
    make_shapes(base / "data" / "test", per_class=4, size=40, seed=3)
    return base / "data"


# ------------------------------------------------------------------ colour-cue images


def make_cue_data(root: Path, per_class: int = 6, classes: int = 3) -> None:
    """root/{train,val}/c<k>/<i>.png: 40x48 noise with channel k dimmed, a learnable cue per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] //= 4  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{i}.png")


# ------------------------------------------------------------------ experiments

# A run small enough for many repeats: 16 train and 8 val images of 20x20 pixels, 3 epochs of 4 steps.
# BatchNorm and dropout make sure a resume must restore running statistics and the RNG to match.
TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "data": {"train_dir": "data/train", "val_dir": "data/val", "image_size": 16, "batch_size": 4},
    "augment": [{"op": "random_resized_crop", "scale": [0.5, 1.0]}, {"op": "horizontal_flip"}],
    "model": {"arch": "scratch_cnn", "channels": [8, 16], "hidden": 16, "dropout": 0.3, "batch_norm": True},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "scheduler": {"name": "cosine"},
    "train": {"epochs": 3},
    "output": {"root": "runs"},
}


def experiment(base: Path, overrides: dict[str, Any] | None = None, filename: str = "exp.toml") -> Path:
    """Write TINY (deep-merged with overrides; a None value deletes a key) to base/filename."""
    cfg = copy.deepcopy(TINY)
    _merge(cfg, overrides or {})
    path = base / filename
    path.write_text(tomli_w.dumps(cfg))
    return path


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def shapes_overrides(data: Path, out: Path, epochs: int = 3, num_workers: int = 0, name: str = "tiny") -> dict[str, Any]:
    """Overrides that turn TINY into the end-to-end experiment on `make_shapes_data`'s folders:
    seed 0, 32-pixel crops in batches of 8, padded random crop and flip (keyed ops), the
    default dropout, Adam at 0.01 and no scheduler, with absolute paths and a test split."""
    return {
        "name": name,
        "seed": 0,
        "data": {"train_dir": str(data / "train"), "val_dir": str(data / "val"), "test_dir": str(data / "test"),
                 "image_size": 32, "batch_size": 8, "num_workers": num_workers},
        "augment": [{"op": "random_crop", "padding": 2}, {"op": "horizontal_flip"}],
        "model": {"dropout": None},
        "optimizer": {"name": "adam", "lr": 0.01},
        "scheduler": None,
        "train": {"epochs": epochs},
        "output": {"root": str(out)},
    }


def train_tiny(base: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Make the tiny data set under base, run its experiment in-process there; returns the experiment path."""
    make_data(base)
    exp_path = experiment(base, overrides)
    run_in(base, exp_path)
    return exp_path


def run_in(base: Path, exp_path: Path, stops: tuple[int | None, ...] = (None,)) -> None:
    """Run an experiment in-process from base (its relative paths start there): one run.run per stop,
    each ending after that many epochs (None: the end), every one after the first a --resume."""
    from imgcls import config, run

    exp = config.load(exp_path)
    with contextlib.chdir(base):
        for i, stop in enumerate(stops):
            run.run(exp, resume=i > 0, progress=False, stop_after=stop)


def whole_and_resumed(tmp_path: Path, overrides: dict[str, Any], prepare=lambda base: None) -> list[dict[str, Any]]:
    """Fingerprints of the tiny experiment run whole and run to epoch 1 then resumed, each on its
    own copy of the tiny data (`prepare` may change a copy first): an exact resume gives two equal."""
    prints = []
    for name, stops in (("whole", (None,)), ("resumed", (1, None))):
        base = tmp_path / name
        make_data(base)
        prepare(base)
        run_in(base, experiment(base, overrides), stops)
        prints.append(fingerprint(base / "runs" / "tiny"))
    return prints


# ------------------------------------------------------------------ the command line


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    return env | {"PYTHONPATH": str(REPO), **extra}


def cli(module: str, *args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    """Start `python -m imgcls.<module> ARGS` with this checkout's imgcls, capturing its output."""
    return subprocess.Popen(
        [sys.executable, "-m", f"imgcls.{module}", *args],
        cwd=cwd, env=kwargs.pop("env", None) or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )


# ------------------------------------------------------------------ reading results


def checkpoint_epoch(path: Path) -> int:
    """The epoch stored in a checkpoint's header, read without torch (0 when there is no file)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        return 0
    return json.loads(header["__metadata__"]["imgcls"])["epoch"]


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """What an exact resume must reproduce: weight bytes of best and last, metrics.json and history.csv
    byte for byte (they hold no wall-clock time; that is timings.json's)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in ("best.safetensors", "last.safetensors"):
        tensors = load_file(run_dir / name)
        h = hashlib.sha256()
        for key in sorted(k for k in tensors if k.startswith(("model.", "ema."))):
            h.update(key.encode() + tensors[key].numpy().tobytes())
        out[name] = h.hexdigest()
    out["metrics.json"] = (run_dir / "metrics.json").read_text()
    out["history.csv"] = (run_dir / "history.csv").read_text()
    return out


# ------------------------------------------------------------------ hostile files


def bomb_png(path, side: int) -> None:
    """A valid greyscale PNG of side x side black pixels written row by row (never held in memory)."""
    blank_png(path, side, side)


def blank_png(path, width: int, height: int) -> None:
    """A valid greyscale PNG of width x height black pixels, written row by row: a few hundred bytes
    whatever its size, as a hostile file can be."""
    compressor, body = zlib.compressobj(9), []
    row = b"\0" * (width + 1)  # filter byte + pixels
    for _ in range(height):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    idat = b"".join(body)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def pickle_payloads(folder: Path) -> tuple[dict[str, Path], Path]:
    """Pickle payloads dressed as checkpoints in folder, and the marker file that proves one ran."""
    import torch

    marker = folder / "payload-ran"
    files = {
        "payload.pt": folder / "payload.pt",
        "pickle.safetensors": folder / "pickle.safetensors",
        "zip.safetensors": folder / "zip.safetensors",
    }
    torch.save({"model.weight": Payload(marker)}, files["payload.pt"])
    files["pickle.safetensors"].write_bytes(pickle.dumps(Payload(marker)))
    shutil.copy(files["payload.pt"], files["zip.safetensors"])
    # The payload is live: an ordinary unpickling runs it. (Never done by imgcls.)
    pickle.loads(files["pickle.safetensors"].read_bytes())
    assert marker.exists()
    marker.unlink()
    return files, marker


# ------------------------------------------------------------------ photo-like images


def structured_image(seed: int, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) array: a smooth colour gradient with a few flat-coloured discs.

    Uniform noise would be the wrong test: no perceptual hash claims to survive JPEG on noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    slopes = rng.uniform(-255, 255, (2, 3))
    pixels = 128 + (xx[..., None] - 0.5) * slopes[0] + (yy[..., None] - 0.5) * slopes[1]
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.1, 0.4)
        disc = (yy * max(height, width) / height - cy) ** 2 + (xx * max(height, width) / width - cx) ** 2 < radius**2
        pixels[disc] = rng.uniform(0, 255, 3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def grey_tiff(path, values: np.ndarray) -> None:
    """An uncompressed one-channel TIFF of 32-bit values, with the SampleFormat its dtype says
    (1 unsigned, 2 signed, 3 float): PIL writes uint32 arrays as signed, so the header is written here."""
    values = np.ascontiguousarray(values)
    assert values.ndim == 2 and values.dtype.itemsize == 4, values.dtype
    fmt = {"u": 1, "i": 2, "f": 3}[values.dtype.kind]
    h, w = values.shape
    pixels = values.astype(values.dtype.newbyteorder("<")).tobytes()
    # (tag, type, value): type 3 SHORT, 4 LONG; entries sorted by tag, as TIFF requires.
    entries = [(256, 4, w), (257, 4, h), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, h), (279, 4, len(pixels)), (339, 3, fmt)]
    ifd_size = 2 + 12 * len(entries) + 4
    offset = 8 + ifd_size  # pixels follow the only IFD
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    with open(path, "wb") as f:
        f.write(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels)
