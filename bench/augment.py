"""Crop + flip three ways, on one CPU thread as a loader worker has it: imgcls's keyed ops in their
per-image form (what imgcls picks on a CPU), the same ops in their batched form (what it picks on a
GPU; here run on the CPU, to show the pick is right there), and transforms v2 image by image.

Equal-sized images, in the decoded cache's (H, W, 3) memory: 256x256 to 224 and 36x36 to 32, with
random_crop (padding 4) + flip and with random_resized_crop + flip. Figures are images per second;
the batched form is timed with fewer repeats (it is ~100x slower on a CPU).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import interleaved, ratio
from imgcls import augment
from imgcls import config as C

CASES = {"224_from_256": (224, 256), "32_from_36": (32, 36)}
OPS = {
    "random_crop": [C.RandomCrop(op="random_crop", padding=4), C.HorizontalFlip(op="horizontal_flip")],
    "random_resized_crop": [C.RandomResizedCrop(op="random_resized_crop"), C.HorizontalFlip(op="horizontal_flip")],
}


def rate(fn, images: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - start)


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    cpu = torch.device("cpu")
    try:
        for name, (size, side) in CASES.items():
            # As the decoded cache gives them: (3, H, W) views of (H, W, 3) pixels.
            pixels = torch.randint(0, 256, (32, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            images = list(pixels.permute(0, 3, 1, 2))
            keys = list(range(32))
            for ops_name, ops in OPS.items():
                keyed, per_image = augment.BatchAugment(tuple(ops), size), augment.build_augment(ops, size)
                repeats = 5 if quick else 40
                result = interleaved({
                    "keyed_per_image": lambda: rate(lambda: keyed(images, 0, 1, keys), 32, repeats),
                    "keyed_batched_on_cpu": lambda: rate(lambda: keyed.planned(images, 0, 1, keys).render(cpu), 32, max(1, repeats // 20)),
                    "transforms_v2_per_image": lambda: rate(lambda: torch.stack([per_image(im) for im in images]), 32, repeats),
                }, rounds)
                picked = result["keyed_per_image"]["median"]
                result["ratio_picked_over_batched"] = ratio(picked, result["keyed_batched_on_cpu"]["median"])
                result["ratio_picked_over_v2"] = ratio(picked, result["transforms_v2_per_image"]["median"])
                out[f"{ops_name}_{name}"] = result
    finally:
        torch.set_num_threads(previous)
    return out
