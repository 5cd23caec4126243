"""`python -m bench.layout [--rounds N]`: what keeping decoded images in HWC memory would save on the
data path. 64 uint8 images 146x195 (the decoded cache's CHW layout, and the same pixels in HWC memory),
each centre-cropped (validation) or cropped, resized to 128 and flipped (training), put in a batch
(CHW: torch.stack; HWC: copied into a channels_last batch) and normalised; microseconds an image.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as F

from bench.common import interleaved, machine, ratio
from imgcls.data import Normalize

N, SIZE = 64, 128


def batches(images: list[torch.Tensor], channels_last: bool, view: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if not channels_last:
        return torch.stack([view(im) for im in images])
    out = torch.empty(N, SIZE, SIZE, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    for k, im in enumerate(images):
        out[k] = view(im)
    return out


def measure(rounds: int) -> dict:
    torch.manual_seed(0)
    normalize = Normalize([0.5] * 3, [0.25] * 3, channels_last=True)
    chw = [torch.randint(0, 256, (3, 146, 195), dtype=torch.uint8) for _ in range(N)]
    hwc = [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in chw]  # same pixels, HWC memory
    views = {
        "validation": lambda im: im[:, 9:137, 33:161],
        "training": lambda im: F.resize(im[:, 5:105, 10:110], [SIZE, SIZE], antialias=True).flip(-1),
    }
    out = {}
    for path, view in views.items():
        assert torch.equal(normalize(batches(chw, False, view)), normalize(batches(hwc, True, view)))

        def timed(images: list[torch.Tensor], channels_last: bool) -> Callable[[], float]:
            def go() -> float:
                start = time.perf_counter()
                for _ in range(5):
                    normalize(batches(images, channels_last, view))
                return (time.perf_counter() - start) / 5 / N * 1e6
            return go

        figures = interleaved({"chw": timed(chw, False), "hwc": timed(hwc, True)}, rounds)
        out[path] = {"us_per_image": figures, "hwc / chw": ratio(figures["hwc"]["median"], figures["chw"]["median"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layout", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    print(json.dumps(measure(parser.parse_args().rounds) | {"machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
