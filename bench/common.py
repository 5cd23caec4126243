"""Shared pieces: interleaved timing, generated image folders, experiments, machine facts."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "data" / "bench"  # generated and converted images; /data/ is git-ignored
PYTHON = sys.executable


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run A, B, A, B, ... `rounds` times; each callable returns its own figure (a rate or seconds).

    Other processes share the cores, so the machine's speed drifts over minutes: alternating the
    contenders exposes both to the same drift, and a ratio of medians cancels most of it.
    """
    raw: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            raw[name].append(fn())
    return {name: {"median": statistics.median(v), "raw": [round(x, 4) for x in v]} for name, v in raw.items()}


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def generated_folder(name: str, classes: int, per_class: dict[str, int], size: tuple[int, int], seed: int = 0) -> Path:
    """An ImageFolder tree of JPEGs (train/val/...), class-dependent colour blobs on noise; built once."""
    from PIL import Image

    root = CACHE / name
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for split, n in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            hue = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 151 + 40) % 256], dtype=np.float32)
            for i in range(n):
                cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * min(w, h)
                blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)[..., None]
                noise = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
                pixels = np.where(blob, 0.7 * hue + 0.3 * noise, noise).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    (root / ".complete").touch()
    return root


def groceries() -> Path:
    """The demo photos: this checkout's data/groceries, made from the package on first use."""
    target = ROOT / "data" / "groceries"
    if (target / "train").is_dir():
        return target
    # Its summary line goes to stderr: a comparison's stdout is its JSON alone.
    subprocess.run([PYTHON, "-m", "imgcls.datasets", "groceries", str(target)], check=True, cwd=ROOT, stdout=sys.stderr)
    return target


def machine() -> dict[str, Any]:
    """What every figure ran on: bits and speeds differ between CPUs with and without AVX-512 (BF16)."""
    import torch

    from imgcls.provenance import cpu_info

    cpu = cpu_info()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "torch_cpu_capability": cpu["capability"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
