"""Tiny generated image folders and experiments for the reliability tests (no downloads, no demo data)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog")

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


def image_array(label: int, index: int, size: int = 20) -> np.ndarray:
    """A noisy image whose class shows in one colour channel, so a tiny CNN can learn it."""
    rng = np.random.default_rng(1000 * label + index)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    a[..., label % 3] = 200
    return a


def make_split(root: Path, per_class: int, classes=CLASSES, offset: int = 0) -> Path:
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(image_array(label, offset + i)).save(folder / f"{i}.png")
    return root


def make_data(base: Path, train: int = 8, val: int = 4, classes=CLASSES) -> Path:
    make_split(base / "data" / "train", train, classes)
    make_split(base / "data" / "val", val, classes, offset=100)
    return base


def experiment(base: Path, overrides: dict[str, Any] | None = None, filename: str = "exp.toml") -> Path:
    """Write TINY (deep-merged with overrides; a None value deletes a key) to base/filename."""
    cfg = copy.deepcopy(TINY)
    _merge(cfg, overrides or {})
    path = base / filename
    path.write_text(tomli_w.dumps(cfg))
    return path


def train_tiny(base: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Make the tiny data set under base, run its experiment in-process there; returns the experiment path."""
    from imgcls import config, run

    make_data(base)
    exp_path = experiment(base, overrides)
    cwd = os.getcwd()
    os.chdir(base)  # the experiment's relative paths start at base
    try:
        run.run(config.load(exp_path), progress=False)
    finally:
        os.chdir(cwd)
    return exp_path


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


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
    """What an exact resume must reproduce: weight bytes of best and last, and every non-timing result."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in ("best.safetensors", "last.safetensors"):
        tensors = load_file(run_dir / name)
        h = hashlib.sha256()
        for key in sorted(k for k in tensors if k.startswith("model.")):
            h.update(key.encode() + tensors[key].numpy().tobytes())
        out[name] = h.hexdigest()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")  # wall-clock time, the one field that may differ
    out["metrics.json"] = metrics
    rows = (run_dir / "history.csv").read_text().splitlines()
    seconds = rows[0].split(",").index("seconds")
    out["history.csv"] = [[v for i, v in enumerate(r.split(",")) if i != seconds] for r in rows]
    return out


def bomb_png(path, side: int) -> None:
    """A valid greyscale PNG of side x side black pixels written row by row (never held in memory)."""
    compressor, body = zlib.compressobj(9), []
    row = b"\0" * (side + 1)  # filter byte + pixels
    for _ in range(side):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    idat = b"".join(body)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
