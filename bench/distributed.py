"""torchrun with 2 processes vs 1 process: steady epoch time of one experiment, and whether the two
runs agree (validation accuracy and the largest weight difference after the last epoch).

Whole runs in fresh processes, interleaved (1, 2, 1, 2, ...). Each figure is the median epoch time
from the run's timings.json, the first epoch (warm-up: allocator, first batches) left out. On a
machine with 2 cores both processes share the same 2 cores that one process uses alone, and gloo
adds an all-reduce per step: the figure shows the cost of distribution there, not a speed-up.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from bench.common import PYTHON, env_for_subprocess, generated_folder, interleaved, ratio


def experiment(folder: Path, data: Path, name: str, epochs: int) -> Path:
    cfg = {
        "name": name,
        "seed": 0,
        "device": "cpu",
        "data": {"train_dir": str(data / "train"), "val_dir": str(data / "val"), "image_size": 64, "batch_size": 32},
        "augment": [{"op": "random_crop", "padding": 4}, {"op": "horizontal_flip"}],
        "model": {"arch": "scratch_cnn", "channels": [16, 32, 64], "dropout": 0.0},
        "train": {"epochs": epochs},
        "output": {"root": str(folder / "runs")},
    }
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def one_run(folder: Path, data: Path, processes: int, epochs: int, runs: list[Path]) -> float:
    name = f"p{processes}-{len(runs)}"
    exp = experiment(folder, data, name, epochs)
    launcher = [PYTHON, "-m", "imgcls.run"] if processes == 1 else [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "imgcls.run"]
    subprocess.run([*launcher, str(exp), "--quiet"], check=True, cwd=folder, env=env_for_subprocess(),
                   stdout=subprocess.DEVNULL)
    runs.append(folder / "runs" / name)
    seconds = json.loads((folder / "runs" / name / "timings.json").read_text())["epoch_seconds"]
    return statistics.median(seconds[str(e)] for e in range(2, epochs + 1))


def agreement(one: Path, two: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    a, b = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k.startswith("model.") and a[k].is_floating_point())
    acc = [json.loads((r / "metrics.json").read_text())["val"]["accuracy"] for r in (one, two)]
    return {"max_abs_weight_difference": diff, "val_accuracy_1": acc[0], "val_accuracy_2": acc[1]}


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    per_class = {"train": 64 if quick else 256, "val": 16 if quick else 64}
    data = generated_folder(f"dist-{per_class['train']}", 4, per_class, (72, 72))
    epochs = 2 if quick else 4
    folder = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    runs: dict[int, list[Path]] = {1: [], 2: []}
    try:
        timed = interleaved({f"{p} process(es), s/epoch": (lambda p=p: one_run(folder, data, p, epochs, runs[p])) for p in (1, 2)}, rounds)
        medians = [timed[f"{p} process(es), s/epoch"]["median"] for p in (1, 2)]
        return {
            "epoch_seconds": timed,
            "ratio_2_over_1": ratio(medians[1], medians[0]),
            "agreement": agreement(runs[1][0], runs[2][0]),
            "images_per_epoch": per_class["train"] * 4,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
