"""GPU figures (CUDA only), one short prepared run: G1 on the device, and the keyed augmentation's
batched form there.

`python -m bench gpu [--quick] [--rounds N]`. For ResNet18 @224 and the scratch CNN @128, bf16,
channels_last, batch 256, 8 loader workers: imgcls's steady training epoch (random_resized_crop +
flip in their batched form on the device, Normalize there too) vs the bare model's
forward+backward+step on one resident batch (target >= 0.9), and validation vs bare forward. Then
the batched form alone: images per second rendering 256 random_resized_crop + flip samples from
341x256 uint8 images on the device, and that they equal the per-image form's pixels.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from bench.common import interleaved
from bench.loop import AUGMENT, Contest
from imgcls import augment
from imgcls import config as C

BATCH, WORKERS = 256, 8


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device; none is visible here")
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": BATCH, "workers": WORKERS}
    sizes = {"resnet18@224": (512, 512) if quick else (4096, 1024), "scratch_cnn@128": (512, 512) if quick else (8192, 1024)}
    for name, (n_train, n_val) in sizes.items():
        contest = Contest(name, "bf16", n_train, n_val, AUGMENT, WORKERS, "cuda", BATCH)
        out[f"{name} bf16"] = contest.ratios(rounds) | {"transforms": contest.loaders["train"].dataset.form}
        print(f"[bench] gpu {name}: {json.dumps(out[f'{name} bf16'])}", file=sys.stderr, flush=True)
    out["batched_form"] = batched_form(rounds)
    return out


def batched_form(rounds: int) -> dict[str, Any]:
    """Rendering rate of the keyed ops' batched form on the GPU, and its equality with the per-image form."""
    ops = (C.RandomResizedCrop(op="random_resized_crop", scale=[0.35, 1.0]), C.HorizontalFlip(op="horizontal_flip"))
    keyed = augment.BatchAugment(ops, 224)
    images = list(torch.randint(0, 256, (BATCH, 3, 256, 341), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    planned = keyed.planned(images, 0, 1, list(range(BATCH)))
    device = torch.device("cuda")
    equal = torch.equal(planned.render(device).cpu(), keyed(images, 0, 1, list(range(BATCH))))

    def rate() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            planned.render(device)
        torch.cuda.synchronize()
        return 10 * BATCH / (time.perf_counter() - start)

    return {"equal_to_per_image_form": equal, "render_img_per_s": interleaved({"render": rate}, rounds)}
