"""`python -m bench.layout [--rounds N]`: what the decoded cache's (H, W, 3) layout buys on the data path
against the (3, H, W) layout it had before (cache FORMAT 1), and whether loading on one torch thread
instead of the process's two would pay.

64 uint8 images 146x195 (G1's scratch CNN images at resize 146), the same pixels in both layouts,
through imgcls's own keyed ops (augment.BatchAugment: per image, then one channels_last batch; on 1 or
2 threads) and data.Normalize (channels_last, on the process's 2 threads): validation's centre crop,
and training's random_resized_crop + flip to 128. Also torch's uint8 antialiased resize alone (a
120x150 crop to 128x128: the (3, H, W) crop as it was, and the dense channels_last copy augment.render
makes), each on 1 and 2 threads; and Normalize's multiply-add on a channels_last batch, broadcast over
channels vs over rows; and a zero pad by 4 of 256x256 images, torchvision's vs augment._pad's.
Microseconds an image, interleaved rounds, medians; contenders' outputs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as F

from bench.common import interleaved, machine, ratio
from imgcls import augment, config
from imgcls.data import Normalize

N, SIZE = 64, 128
OPS = {
    "validation": (),
    "training": (config.RandomResizedCrop(op="random_resized_crop", scale=[0.35, 1.0]), config.HorizontalFlip(op="horizontal_flip")),
}


def on_threads(n: int, load: Callable[[], object], then: Callable[[object], object] = lambda x: x,
               images: int = N) -> Callable[[], float]:
    """Microseconds an image (5 calls over `images` images) of load on n torch threads, then `then` on
    the process's count (as a loader in the main process hands its batch to Normalize)."""

    def go() -> float:
        previous = torch.get_num_threads()
        start = time.perf_counter()
        for _ in range(5):
            torch.set_num_threads(n)
            try:
                batch = load()
            finally:
                torch.set_num_threads(previous)
            then(batch)
        return (time.perf_counter() - start) / 5 / images * 1e6

    return go


def measure(rounds: int) -> dict:
    torch.manual_seed(0)
    normalize = Normalize([0.5] * 3, [0.25] * 3, channels_last=True)
    chw = [torch.randint(0, 256, (3, 146, 195), dtype=torch.uint8) for _ in range(N)]
    hwc = [im.permute(1, 2, 0).contiguous().permute(2, 0, 1) for im in chw]  # same pixels, (H, W, 3) memory
    out = {}
    for path, ops in OPS.items():
        keyed = augment.BatchAugment(ops, SIZE)
        load = {name: (lambda images=images: keyed(images, 0, 1, list(range(N)))) for name, images in (("chw", chw), ("hwc", hwc))}
        assert torch.equal(normalize(load["chw"]()), normalize(load["hwc"]()))
        figures = interleaved({f"{name} {n} thread{'s' * (n > 1)}": on_threads(n, fn, normalize) for name, fn in load.items()
                               for n in (2, 1)}, rounds)
        out[path] = {"us_per_image": figures,
                     "hwc / chw, 2 threads": ratio(figures["hwc 2 threads"]["median"], figures["chw 2 threads"]["median"])}
    crops = {"chw": [im[:, 10:130, 20:170] for im in chw], "hwc": [im[:, 10:130, 20:170] for im in hwc]}
    as_rendered = {"chw": lambda im: im, "hwc": lambda im: im[None].contiguous(memory_format=torch.channels_last)}

    def resize(name: str) -> Callable[[], object]:
        return lambda: [F.resize(as_rendered[name](im), [SIZE, SIZE], antialias=True) for im in crops[name]]

    figures = interleaved({f"{name} {n} thread{'s' * (n > 1)}": on_threads(n, resize(name)) for name in crops
                           for n in (2, 1)}, rounds)
    out["resize alone"] = {"us_per_image": figures,
                           "hwc / chw, 2 threads": ratio(figures["hwc 2 threads"]["median"], figures["chw 2 threads"]["median"]),
                           "hwc / chw, 1 thread": ratio(figures["hwc 1 thread"]["median"], figures["chw 1 thread"]["median"])}
    out["normalize"] = normalize_rows(normalize, rounds)
    out["zero padding"] = zero_padding(rounds)
    return out


def zero_padding(rounds: int) -> dict:
    """A zero pad by 4 of 64 256x256 images in (H, W, 3) memory: torchvision's pad of their (3, H, W)
    views vs augment._pad (the pad on the (H, W, 3) memory), process threads."""
    images = [im.permute(2, 0, 1) for im in torch.randint(0, 256, (N, 256, 256, 3), dtype=torch.uint8)]
    step = augment.Pad(4, 4, 4, 4, "constant")

    def torchvision() -> list[torch.Tensor]:
        return [F.pad(im, [4, 4, 4, 4]) for im in images]

    def interleaved_memory() -> list[torch.Tensor]:
        return [augment._pad(im, step) for im in images]

    assert all(torch.equal(a, b) for a, b in zip(torchvision(), interleaved_memory()))
    n = torch.get_num_threads()
    figures = interleaved({"torchvision": on_threads(n, torchvision), "(H, W, 3)": on_threads(n, interleaved_memory)}, rounds)
    return {"us_per_image": figures, "(H, W, 3) / torchvision": ratio(figures["(H, W, 3)"]["median"], figures["torchvision"]["median"])}


def normalize_rows(normalize: Normalize, rounds: int) -> dict:
    """Normalize's multiply-add on a channels_last batch of 128: broadcast over the innermost
    channels (as a (1, 3, 1, 1) tensor) vs over rows of W * 3 values (what Normalize does)."""
    x = torch.randint(0, 256, (128, 3, SIZE, SIZE), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)

    def broadcast() -> torch.Tensor:
        out = x.to(torch.float32, memory_format=torch.channels_last, copy=True)
        return torch.addcmul(normalize.shift, out, normalize.scale, out=out)

    assert torch.equal(broadcast(), normalize(x))

    n = torch.get_num_threads()
    figures = interleaved({"broadcast over channels": on_threads(n, broadcast, images=len(x)),
                           "rows": on_threads(n, lambda: normalize(x), images=len(x))}, rounds)
    return {"us_per_image": figures, "rows / broadcast": ratio(figures["rows"]["median"], figures["broadcast over channels"]["median"])}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layout", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    print(json.dumps(measure(parser.parse_args().rounds) | {"machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
