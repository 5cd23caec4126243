"""`python -m bench.near_duplicates DIR [--resize 256] [--copies 100] [--seed 0] [--hash phash dhash]`

Measures provenance.perceptual_hash (a DCT hash, pHash) and a difference hash (dHash, the
contender) on an ImageFolder tree with train/ and val/ and/or test/, for choosing
provenance.NEAR_DUPLICATE_BITS:

- false pairs: pairs of distinct files (train x val+test, and train x train across classes) whose
  hashes are within t bits: how many, and what fraction of all such pairs;
- recall on copies: `--copies` training images, each resized by a factor drawn from [0.5, 2] (PIL
  bilinear, bicubic or Lanczos) and re-saved as JPEG at a quality drawn from [60, 95]; a copy is
  found when it is within t bits of its original, both decoded by decoding.decode at `--resize`.

Prints one table per hash for t = 0..12, then the closest distinct pairs, to look at: some may be
one photo stored twice (a true duplicate in the data, not a false pair).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from collections import Counter
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from imgcls import data, decoding, provenance

THRESHOLDS = range(13)
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
TARGET_RECALL = 0.99


def dhash(image: torch.Tensor) -> int:
    """The contender: is each cell of a 9x8 grey thumbnail brighter than its right neighbour?"""
    grey = (image.to(torch.float64) * torch.tensor(provenance.LUMA, dtype=torch.float64).view(3, 1, 1)).sum(0)
    small = F.adaptive_avg_pool2d(grey[None, None], (8, 9))[0, 0]
    bits = (small[:, 1:] > small[:, :-1]).flatten().tolist()
    return sum(1 << (63 - i) for i, bit in enumerate(bits) if bit)


HASHES: dict[str, Callable[[torch.Tensor], int]] = {"phash": provenance.perceptual_hash, "dhash": dhash}


def load_splits(root: str) -> dict[str, data.Split]:
    classes = data.scan_classes(os.path.join(root, "train"))
    names = [n for n in ("train", "val", "test") if os.path.isdir(os.path.join(root, n))]
    return {n: data.scan_split(n, os.path.join(root, n), classes) for n in names}


def make_copy(path: str, rng: np.random.Generator, resize: int, scratch: str) -> torch.Tensor:
    """The file resized by a factor in [0.5, 2], re-saved as JPEG q60..95 and decoded as the run would."""
    with Image.open(path) as img:
        img = decoding.to_rgb(ImageOps.exif_transpose(img))
    factor = rng.uniform(0.5, 2.0)
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    img = img.resize(size, FILTERS[str(rng.choice(list(FILTERS)))])
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
    copy = os.path.join(scratch, "copy.jpg")
    with open(copy, "wb") as f:
        f.write(buffer.getvalue())
    return decoding.decode(copy, resize)


def distinct_pairs(hashes: dict[str, list[int]], splits: dict[str, data.Split]) -> list[tuple[int, str, str]]:
    """(distance, train file, other file) for every pair of distinct photos counted as a false pair."""
    train = splits["train"]
    held_out = [p for n in ("val", "test") if n in splits for p in splits[n].paths]
    held_out_hashes = [h for n in ("val", "test") if n in splits for h in hashes[n]]
    cross = provenance.near_duplicates(hashes["train"], held_out_hashes, provenance.HASH_BITS)
    pairs = [(d, train.paths[i], held_out[j]) for i, j, d in cross]
    for i, j, d in provenance.near_duplicates(hashes["train"], hashes["train"], provenance.HASH_BITS):
        if i < j and train.labels[i] != train.labels[j]:
            pairs.append((d, train.paths[i], train.paths[j]))
    return pairs


def measure(name: str, splits: dict[str, data.Split], resize: int, copies: int, seed: int) -> None:
    fn = HASHES[name]
    hashes = {n: [fn(decoding.decode(p, resize)) for p in split.paths] for n, split in splits.items()}
    pairs = distinct_pairs(hashes, splits)
    rng = np.random.default_rng(seed)
    train = splits["train"]
    with tempfile.TemporaryDirectory() as scratch:
        copy_distances = [
            provenance.hamming(fn(make_copy(train.paths[i], rng, resize, scratch)), hashes["train"][i])
            for i in rng.choice(len(train.paths), size=copies, replace=False)
        ]
    print(f"\n{name}: {len(pairs)} distinct pairs, {copies} copies, decoded at resize {resize}")
    print_table(Counter(d for d, _, _ in pairs), len(pairs), copy_distances)
    for d, a, b in sorted(pairs)[:8]:
        print(f"  {d:2d} bits: {a}  {b}")


def print_table(pair_distances: Counter, total: int, copy_distances: list[int]) -> None:
    print(f"copy distances: {sorted(Counter(copy_distances).items())}")
    print(f"closest distinct pairs, (bits, pairs): {sorted(pair_distances.items())[:6]}")
    print(" t | recall | false pairs | false-pair rate")
    for t in THRESHOLDS:
        recall = sum(d <= t for d in copy_distances) / len(copy_distances)
        false = sum(n for d, n in pair_distances.items() if d <= t)
        print(f"{t:2d} | {recall:6.3f} | {false:11d} | {false / total:.2e}")
    enough = [t for t in THRESHOLDS if sum(d <= t for d in copy_distances) >= TARGET_RECALL * len(copy_distances)]
    clean = [t for t in THRESHOLDS if not any(d <= t for d in pair_distances)]
    print(f"recall >= {TARGET_RECALL} from t = {min(enough, default=None)}", end="; ")
    print(f"no false pair up to t = {max(clean, default=None)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="ImageFolder tree with train/ and val/ and/or test/")
    parser.add_argument("--resize", type=int, default=256, help="shorter side after decoding, pixels")
    parser.add_argument("--copies", type=int, default=100, help="training images copied, resized and re-encoded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hash", choices=sorted(HASHES), nargs="+", default=list(HASHES))
    args = parser.parse_args(argv)
    # One thumbnail at a time gains nothing from intra-op threads; on 2 busy cores OpenMP's
    # spin-waiting made each hash several times slower.
    torch.set_num_threads(1)
    splits = load_splits(args.root)
    for name in args.hash:
        measure(name, splits, args.resize, args.copies, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
