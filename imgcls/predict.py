"""Prediction: class names and probabilities for images, with the run's exact eval preprocessing.

`python -m imgcls.predict EXP CKPT IMAGE [IMAGE|DIR ...] [--top-k K] [--tta none|flip] [--json | --csv]`
`python -m imgcls.predict --onnx MODEL.onnx IMAGE [IMAGE|DIR ...] [...]` (a file `imgcls.export` wrote)

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
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, TextIO

import torch

from imgcls import augment, config, data, decoding, evaluate, report
from imgcls.errors import CheckpointError, DataError, guarded, optional_import


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


@dataclass(frozen=True)
class Predictor:
    """What classifying files takes: the decode and crop sizes, the batch size, the class names,
    `logits`, a uint8 batch of eval crops (N, 3, image_size, image_size) -> float32 logits (N, classes),
    `probabilities` of those logits, and `used`, the TTA and temperature every output row names."""

    classes: list[str]
    resize_size: int
    image_size: int
    batch_size: int
    logits: Callable[[torch.Tensor], torch.Tensor]
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    used: dict[str, Any]


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of uncalibrated logits."""
    return logits.softmax(1)


def from_checkpoint(trained: evaluate.Trained) -> Predictor:
    d, cal = trained.exp.data, trained.calibration
    return Predictor(
        trained.classes, d.resize_size, d.image_size, d.eval_batch_size,
        lambda batch: evaluate.forward(trained.model, batch, trained.inputs, trained.tta),
        cal.probabilities if cal else softmax,
        {"tta": trained.tta, "temperature": cal.temperature if cal else None},
    )


def classify(trained: evaluate.Trained, paths: list[str], top_k: int) -> tuple[list[dict], list[str]]:
    """Top-k (class, probability) per readable image, in batches of eval_batch_size, with the TTA and
    the temperature (None: uncalibrated) used; and the errors."""
    return classify_with(from_checkpoint(trained), paths, top_k)


def classify_with(predictor: Predictor, paths: list[str], top_k: int) -> tuple[list[dict], list[str]]:
    """`classify` for any predictor: a checkpoint's model or an exported ONNX file."""
    transform = augment.eval_transform(predictor.image_size)
    results, errors = [], []
    batch_paths, batch = [], []

    def flush() -> None:
        if not batch:
            return
        logits = predictor.logits(torch.stack(batch))
        probs = predictor.probabilities(logits)
        # Rank by logits, as evaluation's argmax does: logits 1e-10 apart have equal float32
        # probabilities, and so may two that a temperature above 1 divides into one float.
        top = logits.topk(min(top_k, probs.shape[1]), dim=1).indices
        for path, p, indices in zip(batch_paths, probs, top):
            rows = [{"class": predictor.classes[i], "probability": float(p[i])} for i in indices]
            results.append({"path": path, "top": rows} | predictor.used)
        batch_paths.clear()
        batch.clear()

    for path, image in _decoded_ahead(paths, predictor.resize_size, predictor.batch_size):
        if isinstance(image, DataError):
            errors.append(str(image))
            continue
        batch_paths.append(path)
        batch.append(transform(image))
        if len(batch) == predictor.batch_size:
            flush()
    flush()
    return results, errors


# ------------------------------------------------------------------------------ exported ONNX models

ONNX_FORMAT = "imgcls-onnx/1"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
ONNX_LAYOUT = "uint8 RGB (N, 3, image_size, image_size), normalised inside the graph"


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported file carries in its ONNX metadata_props (string values; lists as JSON), so a
    deployment needs nothing but the file: classes in label order, the preprocessing that makes the
    graph's input, and where the weights came from. `imgcls.export` writes it; `from_onnx` reads it."""

    classes: list[str]
    image_size: int
    resize_size: int
    normalize_mean: list[float]
    normalize_std: list[float]
    experiment: str  # the checkpoint's resolved experiment, canonical TOML (config.to_toml)
    experiment_sha256: str
    checkpoint_sha256: str  # of the .safetensors file, as sha256sum prints it
    imgcls_version: str

    def props(self) -> dict[str, str]:
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}
        return {"format": ONNX_FORMAT, "input": ONNX_LAYOUT} | values

    @classmethod
    def parse(cls, props: dict[str, str], source: str) -> OnnxMetadata:
        names = {f.name: f.type for f in fields(cls)}  # types as strings: annotations are postponed
        missing = [k for k in ["format", *names] if k not in props]
        if missing or props["format"] != ONNX_FORMAT:
            lacks = f"lacks {missing}" if missing else f"says format {props['format']!r}, not {ONNX_FORMAT!r}"
            raise CheckpointError(f"{source}: an ONNX model, but not one imgcls.export wrote (its metadata {lacks})")
        return cls(**{k: props[k] if kind == "str" else json.loads(props[k]) for k, kind in names.items()})


def from_onnx(model: str | bytes, source: str) -> Predictor:
    """An exported ONNX file (a path, or its bytes) run by onnxruntime on the CPU, with the sizes and
    classes its metadata holds; the graph normalises, so it takes the uint8 eval crops as they are."""
    ort = optional_import("onnxruntime", "export")
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    # onnxruntime's errors (NoSuchFile, InvalidProtobuf, ...) derive from Exception alone.
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{source}: not a readable ONNX model ({type(e).__name__}: {str(e).strip()})") from None
    meta = OnnxMetadata.parse(session.get_modelmeta().custom_metadata_map, source)
    batch_size = config.loads(meta.experiment, f"{source} (stored experiment)").data.eval_batch_size

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})[0])

    # An export is the plain model: no test-time augmentation, no temperature.
    return Predictor(meta.classes, meta.resize_size, meta.image_size, batch_size, logits, softmax,
                     {"tta": "none", "temperature": None})


# ------------------------------------------------------------------------------------------ files


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
    parser = argparse.ArgumentParser(
        prog="python -m imgcls.predict", description=__doc__.splitlines()[0],
        usage="%(prog)s (EXP CKPT | --onnx MODEL.onnx) IMAGE [IMAGE|DIR ...] [--top-k K] [--tta none|flip] [--json | --csv]",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="EXP CKPT IMAGE",
        help="the experiment TOML the checkpoint was trained with, the .safetensors checkpoint "
        "(e.g. runs/NAME/best.safetensors), then image files or folders of images; with --onnx, images only",
    )
    parser.add_argument(
        "--onnx", metavar="MODEL.onnx", help="classify with a model imgcls.export wrote, through onnxruntime"
    )
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
    if args.onnx is None and len(args.inputs) < 3:
        parser.error("give EXP CKPT and at least one image, or --onnx MODEL.onnx and images")
    if args.onnx is not None and args.tta not in (None, "none"):
        parser.error("--tta applies to a checkpoint: an ONNX export is the plain model")

    def go() -> int:
        if args.onnx is not None:
            predictor, images = from_onnx(args.onnx, args.onnx), args.inputs
        else:
            trained = evaluate.load_for_inference(*args.inputs[:2], args.tta)
            predictor, images = from_checkpoint(trained), args.inputs[2:]
        paths, empty = expand(images)
        results, errors = classify_with(predictor, paths, args.top_k)
        write(results, args.format or "text", sys.stdout)
        for e in empty + errors:
            print(f"error: {e}", file=sys.stderr)
        return 1 if errors else 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
