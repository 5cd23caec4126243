"""The decoded cache, measured: memory against data set size, cold vs warm preflight, pool of 2 vs 1.

(a) peak RSS of a whole 1-epoch `imgcls.run` process on N and 4N generated JPEGs at 224, warm
    cache (cold too, for the build's own peak); the ratio 4N / N is what must stay near 1.
(b) the preflight (`data.prepare`, every split) in a fresh process: cold cache vs warm.
(c) the cold preflight with data.decode_workers = 2 vs 1.
Each figure is a whole child process, so nothing one contender warmed up helps the other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from bench.common import PYTHON, ROOT, env_for_subprocess, generated_folder, interleaved, ratio

SIZE = (400, 300)  # phone-photo shape, scaled down: decoded at 256 on the shorter side


def experiment(folder: Path, data: Path, cache_dir: Path, name: str, workers: int | str = "auto") -> Path:
    cfg = {
        "name": name,
        "seed": 0,
        "device": "cpu",
        "data": {"train_dir": str(data / "train"), "val_dir": str(data / "val"), "image_size": 224,
                 "batch_size": 32, "cache_dir": str(cache_dir), "decode_workers": workers},
        "augment": [{"op": "random_resized_crop"}, {"op": "horizontal_flip"}],
        "model": {"arch": "scratch_cnn", "channels": [8, 16]},
        "train": {"epochs": 1},
        "output": {"root": str(folder / "runs")},
    }
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def child(args: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one child process, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=env_for_subprocess(), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} failed")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


PREFLIGHT = "import sys; from imgcls import config, data; data.prepare(config.load(sys.argv[1]).data, progress=False)"


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    n = 40 if quick else 250  # per class, 4 classes, train; val is a quarter
    sets = {k: generated_folder(f"cache-{k * n}", 4, {"train": k * n, "val": max(1, k * n // 4)}, SIZE) for k in (1, 4)}
    work = Path(tempfile.mkdtemp(prefix="imgcls-bench-cache-"))
    out: dict[str, Any] = {"images": {f"{k}N": 5 * k * n for k in (1, 4)}}
    try:
        # (a) memory: one epoch, warm cache, whole process.
        rss: dict[str, list[float]] = {}
        for k, data in sets.items():
            cache_dir = work / f"cache-{k}"
            cold = child(["-m", "imgcls.run", str(experiment(work, data, cache_dir, f"cold{k}")), "--quiet"])
            warm = child(["-m", "imgcls.run", str(experiment(work, data, cache_dir, f"warm{k}")), "--quiet"])
            rss[f"{k}N"] = [cold[1] / 2**20, warm[1] / 2**20]
        out["a_peak_rss_mb"] = {key: {"cold": round(v[0]), "warm": round(v[1])} for key, v in rss.items()}
        out["a_rss_ratio_4N_over_N_warm"] = ratio(rss["4N"][1], rss["1N"][1])
        out["a_rss_ratio_4N_over_N_cold"] = ratio(rss["4N"][0], rss["1N"][0])

        # (b) and (c): the preflight alone over the 4N set, cold (fresh cache folder) vs warm.
        data = sets[4]
        warm_dir = work / "warm"
        warm_exp = experiment(work, data, warm_dir, "pre-warm")
        child(["-c", PREFLIGHT, str(warm_exp)])  # builds it once

        def cold(workers: int) -> float:
            cache_dir = work / f"cold-{workers}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            return child(["-c", PREFLIGHT, str(experiment(work, data, cache_dir, f"pre-{workers}", workers))])[0]

        timings = interleaved({
            "cold_1_process": lambda: cold(1),
            "cold_2_processes": lambda: cold(2),
            "warm": lambda: child(["-c", PREFLIGHT, str(warm_exp)])[0],
        }, rounds)
        out["preflight_seconds"] = timings
        out["b_warm_over_cold"] = ratio(timings["warm"]["median"], timings["cold_1_process"]["median"])
        out["c_speedup_2_over_1"] = ratio(timings["cold_1_process"]["median"], timings["cold_2_processes"]["median"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
