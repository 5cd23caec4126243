"""Prediction: class names and probabilities for images, with the run's exact eval preprocessing.

`python -m imgcls.predict EXP CKPT IMAGE [IMAGE|DIR ...] [--top-k K] [--tta none|flip] [--json | --csv]`

Each image is decoded like the training data (upright, RGB, shorter side resize_size) and
centre-cropped like evaluation. A file that cannot be read gets its own error line; the others are
still classified, and the exit status is 1 when any failed. Probabilities are temperature-scaled
when `python -m imgcls.calibrate` fitted a temperature for this checkpoint file (calibration.json
beside it); every output says which test-time augmentation and which temperature it used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, TextIO

import torch

from imgcls import data, decoding, evaluate, report
from imgcls.errors import DataError, guarded


def expand(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files as given; folders become their image files (recursively, sorted, hidden ones skipped).
    Also returns an error for each folder that holds no image file, saying what it holds instead."""
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item) and not item.lower().endswith(data.IMAGE_EXTENSIONS):
            others: Counter = Counter()
            found = data.image_files(item, Counter(), others)
            if not found:
                errors.append(f"{item}: a folder holding no images{data.unlisted(others)}")
            paths += found
        else:
            paths.append(item)
    return paths, errors


def classify(trained: evaluate.Trained, paths: list[str], top_k: int) -> tuple[list[dict], list[str]]:
    """Top-k (class, probability) per readable image, in batches of eval_batch_size, with the TTA and
    the temperature (None: uncalibrated) used; and the errors."""
    exp = trained.exp
    transform = data.eval_transform(exp.data.image_size)
    cal = trained.calibration
    used = {"tta": trained.tta, "temperature": cal.temperature if cal else None}
    results, errors = [], []
    batch_paths, batch = [], []

    def flush() -> None:
        if not batch:
            return
        logits = evaluate.forward(trained.model, torch.stack(batch), trained.inputs, trained.tta)
        probs = cal.probabilities(logits) if cal else logits.softmax(1)
        # Rank by logits, as evaluation's argmax does: logits 1e-10 apart have equal float32
        # probabilities, and so may two that a temperature above 1 divides into one float.
        top = logits.topk(min(top_k, probs.shape[1]), dim=1).indices
        for path, p, indices in zip(batch_paths, probs, top):
            top_k_rows = [{"class": trained.classes[i], "probability": float(p[i])} for i in indices]
            results.append({"path": path, "top": top_k_rows} | used)
        batch_paths.clear()
        batch.clear()

    for path, image in _decoded_ahead(paths, exp.data.resize_size, exp.data.eval_batch_size):
        if isinstance(image, DataError):
            errors.append(str(image))
            continue
        batch_paths.append(path)
        batch.append(transform(image))
        if len(batch) == exp.data.eval_batch_size:
            flush()
    flush()
    return results, errors


def _decoded_ahead(paths: list[str], resize_size: int, window: int) -> Iterator[tuple[str, torch.Tensor | DataError]]:
    """(path, image or its DataError) in order, decoded up to `window` files ahead in a thread.

    PIL decodes without the GIL, so the next batch's files are read while the model runs on this
    one; the window bounds the memory a large folder can take.
    """

    def attempt(path: str) -> torch.Tensor | DataError:
        try:
            return decoding.decode(path, resize_size)
        except DataError as e:
            return e

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(attempt, p) for p in paths[:window])
        for i, path in enumerate(paths):
            image = pending.popleft().result()
            if i + window < len(paths):
                pending.append(pool.submit(attempt, paths[i + window]))
            yield path, image


def write(results: list[dict], fmt: str, out: TextIO) -> None:
    """Results as JSON (every name exact, see report's docstring), CSV (valid UTF-8) or text lines
    (one per image: its names' line breaks and control characters escaped). Each row says its TTA and
    temperature: JSON and CSV as fields `tta` and `temperature` (null or empty: uncalibrated), text as
    `[tta flip, calibrated: T=1.2345]` at the end of the line."""
    if fmt == "json":
        json.dump(results, out, indent=2, ensure_ascii=True)
        out.write("\n")
    elif fmt == "csv":
        k = max((len(r["top"]) for r in results), default=1)
        header = ["path"] + [f"{name}{i}" for i in range(1, k + 1) for name in ("class", "probability")] + ["tta", "temperature"]
        rows = [
            [r["path"]] + [v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}")]
            + [""] * (2 * (k - len(r["top"]))) + [r["tta"], "" if r["temperature"] is None else repr(r["temperature"])]
            for r in results
        ]
        report.write_csv(out, [header, *rows])
    else:
        for r in results:
            guesses = ", ".join(f"{report.display_name(t['class'])} {t['probability']:.3f}" for t in r["top"])
            scaled = "uncalibrated" if r["temperature"] is None else f"calibrated: T={r['temperature']:.4f}"
            out.write(f"{report.display_name(r['path'])}: {guesses}  [tta {r['tta']}, {scaled}]\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.predict", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the experiment TOML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (e.g. runs/NAME/best.safetensors)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=1, help="how many classes to list per image (default 1)")
    parser.add_argument(
        "--tta", choices=["none", "flip"], help="test-time augmentation (default: the experiment's evaluate.tta)"
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="JSON output")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV output")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    def go() -> int:
        trained = evaluate.load_for_inference(args.experiment, args.checkpoint, args.tta)
        paths, empty = expand(args.images)
        results, errors = classify(trained, paths, args.top_k)
        write(results, args.format or "text", sys.stdout)
        for e in empty + errors:
            print(f"error: {e}", file=sys.stderr)
        return 1 if errors else 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
