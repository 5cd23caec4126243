"""G2: whole processes, imgcls against the template's loop, same images, same epochs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

from bench.common import CACHE, PYTHON, ROOT, env_for_subprocess, groceries, interleaved, ratio

# The template's recipe in imgcls's words; everything else is imgcls's defaults.
CASES = {
    "scratch_cnn": {
        "size": 128, "epochs": 8, "target": 2.5, "model": {"arch": "scratch_cnn"},
        "augment": [{"op": "horizontal_flip"}],
    },
    "scratch_cnn_bf16": {
        "size": 128, "epochs": 8, "target": 4.0, "model": {"arch": "scratch_cnn"},
        "augment": [{"op": "horizontal_flip"}], "precision": "bf16", "template": "scratch_cnn",
    },
    # No flip: a deterministic pipeline lets imgcls cache the frozen backbone's features.
    "resnet18_frozen": {
        "size": 224, "epochs": 10, "target": 8.0, "augment": [],
        "model": {"arch": "resnet18", "weights": "none", "freeze_backbone": True},
    },
}


def _experiment(name: str, case: dict, root, epochs: int) -> str:
    import tomli_w

    exp = {
        "name": name, "device": "cpu",
        "data": {"train_dir": f"{root}/train", "val_dir": f"{root}/val", "test_dir": f"{root}/test",
                 "image_size": case["size"], "batch_size": 64, "normalize": "half"},
        "augment": case["augment"], "model": case["model"],
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": epochs, "precision": case.get("precision", "fp32")},
        "output": {"root": str(CACHE / "runs")},
    }
    path = CACHE / f"{name}.toml"
    path.write_text(tomli_w.dumps(exp))
    return str(path)


def _process(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=env_for_subprocess(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def g2(quick: bool, rounds: int) -> dict[str, Any]:
    root = groceries()
    CACHE.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"data": str(root), "note": "ResNet18 weights are 'none' on both sides (offline)"}
    for name, case in CASES.items():
        epochs = 1 if quick else case["epochs"]
        exp_path = _experiment(f"g2_{name}", case, root, epochs)
        accuracy: dict[str, list[float]] = {"imgcls": [], "template": []}

        def imgcls_run() -> float:
            shutil.rmtree(CACHE / "runs" / f"g2_{name}", ignore_errors=True)
            seconds, _ = _process(["-m", "imgcls.run", exp_path, "--quiet"])
            metrics = json.loads((CACHE / "runs" / f"g2_{name}" / "metrics.json").read_text())
            accuracy["imgcls"].append(metrics["test"]["accuracy"])
            return seconds

        def template_run() -> float:
            kind = case.get("template", name)
            seconds, stdout = _process(["-m", "bench.template_loop", kind, str(root), str(case["size"]), str(epochs)])
            accuracy["template"].append(json.loads(stdout.strip().splitlines()[-1])["test_acc"])
            return seconds

        times = interleaved({"template": template_run, "imgcls": imgcls_run}, rounds)
        out[name] = {
            "epochs": epochs,
            "speedup": ratio(times["template"]["median"], times["imgcls"]["median"]),
            "target": f">= {case['target']}x at equal or better test accuracy",
            "seconds": times,
            "test_accuracy": accuracy,
        }
    return out
