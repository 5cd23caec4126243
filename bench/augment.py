"""Random crop + flip: imgcls's keyed ops on a batch vs transforms v2 image by image.

Crops and flips always run as imgcls's keyed ops (`data.BatchAugment`, any mix of sizes); this
measures that choice against the alternative on equal-sized images (256x256 cropped to 224, and
36x36 cropped to 32), in one thread as a loader worker has it. Figures are images per second.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import interleaved, ratio
from imgcls import config as C
from imgcls import data

CASES = {"224_from_256": (224, 256), "32_from_36": (32, 36)}


def rate(fn, images: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - start)


def compare(quick: bool, rounds: int) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = [C.RandomCrop(op="random_crop", padding=4), C.HorizontalFlip(op="horizontal_flip")]
    out: dict[str, Any] = {}
    try:
        for name, (size, side) in CASES.items():
            images = list(torch.randint(0, 256, (32, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
            keyed, per_image = data.BatchAugment(tuple(ops), size), data.build_augment(ops, size)
            repeats = 5 if quick else 40
            result = interleaved({
                "keyed_batch": lambda: rate(lambda: keyed(images, 0, 1, list(range(32))), 32, repeats),
                "transforms_v2_per_image": lambda: rate(lambda: torch.stack([per_image(im) for im in images]), 32, repeats),
            }, rounds)
            result["ratio_keyed_over_v2"] = ratio(result["keyed_batch"]["median"], result["transforms_v2_per_image"]["median"])
            out[name] = result
    finally:
        torch.set_num_threads(previous)
    return out
