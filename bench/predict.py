"""G4: `imgcls.predict` over a folder against a bare forward over the same images, pre-made as
tensors; and the cold start of `python -m imgcls.predict` on one image against importing torch."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import CACHE, PYTHON, ROOT, env_for_subprocess, generated_folder, interleaved, ratio
from bench.loop import MODELS, experiment
from imgcls import augment, config, decoding, evaluate, models, predict, train
from imgcls.rundir import RunDir


def _checkpoint(name: str, root) -> tuple[str, str]:
    """An experiment file and a checkpoint of an untrained model: prediction speed ignores the weights."""
    model_cfg, size, _ = MODELS[name]
    exp = experiment(model_cfg, size, "fp32", root).model_copy(update={"name": f"g4_{name.split('@')[0]}"})
    exp_path = CACHE / f"{exp.name}.toml"
    exp_path.write_text(config.to_toml(exp))
    model = models.build(exp.model, 4, torch.device("cpu"), exp.train.channels_last)
    ckpt_path = CACHE / f"{exp.name}.safetensors"
    RunDir(CACHE, exp, [f"class{c}" for c in range(4)]).save(ckpt_path.name, model, train.LoopState(train.Monitor("min")))
    return str(exp_path), str(ckpt_path)


def folder(name: str, quick: bool, rounds: int) -> dict[str, Any]:
    n = 64 if quick else 256
    root = generated_folder(f"{name.replace('@', '_')}_predict_{n}", 4, {"train": 1, "val": n // 4}, MODELS[name][2])
    exp_path, ckpt_path = _checkpoint(name, root)
    loaded = evaluate.load_for_inference(exp_path, ckpt_path)
    paths, _ = predict.expand([f"{root}/val"])
    transform = augment.eval_transform(loaded.exp.data.image_size)
    batch = loaded.exp.data.eval_batch_size
    crops = [transform(decoding.decode(p, loaded.exp.data.resize_size)) for p in paths]
    ready = [loaded.inputs.prepare(torch.stack(crops[i : i + batch])) for i in range(0, len(crops), batch)]

    def imgcls_predict() -> float:
        start = time.perf_counter()
        results, _ = predict.classify(loaded, paths, top_k=1)
        return len(results) / (time.perf_counter() - start)

    def bare_forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x in ready:
                loaded.model(x).softmax(1)
        return len(paths) / (time.perf_counter() - start)

    imgcls_predict(), bare_forward()  # warm-up
    rates = interleaved({"imgcls": imgcls_predict, "bare": bare_forward}, rounds)
    return {"images": len(paths), "ratio": ratio(rates["imgcls"]["median"], rates["bare"]["median"]), "img_per_s": rates}


def cold_start(rounds: int) -> dict[str, Any]:
    import subprocess

    root = generated_folder("scratch_cnn_128_predict_64", 4, {"train": 1, "val": 16}, MODELS["scratch_cnn@128"][2])
    exp_path, ckpt_path = _checkpoint("scratch_cnn@128", root)
    image = sorted((root / "val" / "class0").iterdir())[0]

    def launch(args: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run([PYTHON, *args], cwd=ROOT, env=env_for_subprocess(), check=True, capture_output=True)
        return time.perf_counter() - start

    seconds = interleaved(
        {
            "import_torch_torchvision": lambda: launch(["-c", "import torch, torchvision"]),
            "imgcls_predict_one_image": lambda: launch(["-m", "imgcls.predict", exp_path, ckpt_path, str(image)]),
        },
        rounds,
    )
    base, full = seconds["import_torch_torchvision"]["median"], seconds["imgcls_predict_one_image"]["median"]
    return {"ratio": ratio(full, base), "extra_seconds": round(full - base, 3), "seconds": seconds}


def g4(quick: bool, rounds: int) -> dict[str, Any]:
    return {
        "target": ">= 0.9 of bare forward",
        "note": "imgcls decodes each JPEG inside the timed region; the bare side gets pre-made tensors",
        **{name: folder(name, quick, rounds) for name in MODELS},
        "cold_start": cold_start(rounds),
    }
