"""Tiny generated image folders and experiments, so tests never need downloaded data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Each class is a shape in a colour; a small CNN separates them within a few epochs.
SHAPES = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 60, 220)}


def shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in SHAPES[kind])
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_split(root: Path, per_class: int, size: int, seed: int, classes=tuple(SHAPES)) -> Path:
    """root/<class>/<i>.png|jpg, alternating PNG and JPEG so both decoders are exercised."""
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = shape_image(kind, size, rng)
            if i % 2:
                img.save(root / kind / f"{i:03d}.jpg", quality=95)
            else:
                img.save(root / kind / f"{i:03d}.png")
    return root


def tiny_experiment(data: Path, out: Path, **overrides) -> str:
    """A small scratch-CNN experiment on shapes_data, as TOML text."""
    fields = {"name": "tiny", "epochs": 3, "num_workers": 0, "extra": ""}
    fields.update(overrides)
    return f"""
name = "{fields['name']}"
seed = 0
device = "cpu"

[data]
train_dir = "{data / 'train'}"
val_dir = "{data / 'val'}"
test_dir = "{data / 'test'}"
image_size = 32
batch_size = 8
num_workers = {fields['num_workers']}

[[augment]]
op = "random_crop"
padding = 2

[[augment]]
op = "horizontal_flip"

[model]
arch = "scratch_cnn"
channels = [8, 16]
hidden = 16
batch_norm = true

[optimizer]
name = "adam"
lr = 0.01

[train]
epochs = {fields['epochs']}

[output]
root = "{out}"
{fields['extra']}
"""
