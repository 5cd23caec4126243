"""Shared hypothesis strategies: tensor shapes, layer parameters, logits, monitored values, experiments.

The experiment strategies mirror config.py variant by variant: AUGMENT_FIELDS, MODEL_FIELDS,
OPTIMIZER_FIELDS, SCHEDULER_FIELDS and SECTION_FIELDS give every union member and section a strategy
per field, and test_config_roundtrip checks that they cover the schema exactly, so a field added to
the schema without a strategy fails a test.
"""

from __future__ import annotations

import math
import os
import typing
from typing import Any

import torch
from hypothesis import strategies as st

from imgcls import config as C
from imgcls.errors import ConfigError

seeds = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ layers, tensors


@st.composite
def conv_params(draw) -> dict[str, int]:
    """Any Conv2d geometry, including ones whose kernel does not fit (the layer must refuse those)."""
    return {
        "h": draw(st.integers(1, 24)),
        "w": draw(st.integers(1, 24)),
        "k": draw(st.integers(1, 7)),
        "s": draw(st.integers(1, 4)),
        "p": draw(st.integers(0, 4)),
        "d": draw(st.integers(1, 3)),
        "cin": draw(st.integers(1, 3)),
        "cout": draw(st.integers(1, 3)),
    }


@st.composite
def scratch_cnns(draw, max_blocks: int = 3, max_channels: int = 6, batch_norm=None) -> C.ScratchCNN:
    """Small scratch CNN configs; batch_norm is a strategy (default: either)."""
    return C.ScratchCNN(
        arch="scratch_cnn",
        channels=draw(st.lists(st.integers(1, max_channels), min_size=1, max_size=max_blocks)),
        hidden=draw(st.integers(1, 8)),
        dropout=draw(st.floats(0, 0.9)),
        batch_norm=draw(st.booleans() if batch_norm is None else batch_norm),
    )


def logits(max_n: int = 6, max_classes: int = 6, bound: float = 30.0, min_classes: int = 2):
    """(logits float64 (N, K), labels (N,)) with finite values in [-bound, bound]."""

    @st.composite
    def build(draw):
        n = draw(st.integers(1, max_n))
        k = draw(st.integers(min_classes, max_classes))
        values = draw(st.lists(st.floats(-bound, bound), min_size=n * k, max_size=n * k))
        labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float64).view(n, k), torch.tensor(labels)

    return build()


# Monitored values and min_delta on a 1/64 grid: differences are exact, so "an improvement larger than
# min_delta" has one meaning (off the grid, `v < ref - d` and `ref - v > d` can disagree by an ulp).
# The coarse grid makes ties and improvements of exactly min_delta common; NaN is a diverged epoch.
monitored_value = st.one_of(st.integers(0, 128).map(lambda i: i / 64), st.just(math.nan))


def _walk(start: int, steps: list[int]) -> list[float]:
    values, level = [], start
    for step in steps:
        level = max(0, level + step)
        values.append(level / 64)
    return values


# Independent values, and walks of small steps like real validation curves (slow creeps, plateaus).
monitored_values = st.one_of(
    st.lists(monitored_value, min_size=1, max_size=12),
    st.builds(_walk, st.integers(0, 128), st.lists(st.integers(-6, 6), min_size=1, max_size=12)),
)
min_deltas = st.integers(0, 16).map(lambda i: i / 64)


# --------------------------------------------------------------------------------------- the schema


def number(lo: float | None = None, hi: float | None = None, *, exclude_lo=False, exclude_hi=False, inf=False):
    """A float field: ints pass as floats in the schema (and are stored as floats), so both are drawn."""
    floats = st.floats(lo, hi, exclude_min=exclude_lo, exclude_max=exclude_hi, allow_nan=False, allow_infinity=inf)
    lo_int = None if lo is None else math.ceil(lo) + (exclude_lo and math.ceil(lo) == lo)
    hi_int = None if hi is None else math.floor(hi) - (exclude_hi and math.floor(hi) == hi)
    if lo_int is not None and hi_int is not None and lo_int > hi_int:
        return floats
    return floats | st.integers(lo_int, hi_int)


def ordered_pair(lo=None, hi=None, *, exclude_lo=False):
    return st.lists(number(lo, hi, exclude_lo=exclude_lo), min_size=2, max_size=2).map(sorted)


fraction = number(0, 1)
texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)

AUGMENT_FIELDS: dict[type, dict[str, Any]] = {
    C.RandomResizedCrop: {"scale": ordered_pair(0, 1, exclude_lo=True), "ratio": ordered_pair(0, 4, exclude_lo=True)},
    C.RandomCrop: {
        "padding": st.integers(0, 12),
        "padding_mode": st.sampled_from(["constant", "edge", "reflect", "symmetric"]),
    },
    C.Resize: {"size": st.integers(8, 40)},
    C.HorizontalFlip: {"p": fraction},
    C.VerticalFlip: {"p": fraction},
    C.Rotation: {"degrees": number(0, 180)},
    C.ColorJitter: {
        "brightness": number(0, 2),
        "contrast": number(0, 2),
        "saturation": number(0, 2),
        "hue": number(0, 0.5),
    },
    C.Grayscale: {"p": fraction},
    C.GaussianBlur: {
        "kernel_size": st.integers(0, 20).map(lambda k: 2 * k + 1),
        "sigma": ordered_pair(0, 3, exclude_lo=True),
    },
    C.TrivialAugment: {"num_magnitude_bins": st.integers(2, 40)},
    C.RandAugment: {"num_ops": st.integers(1, 4), "magnitude": st.integers(0, 30)},
    C.RandomErasing: {"p": fraction, "scale": ordered_pair(0, 1), "ratio": ordered_pair(0, 4, exclude_lo=True)},
}

# For pipelines that actually run: magnitudes torchvision computes with in float32. A ratio of
# 1e-320 or a brightness of 1e308 is schema-valid but overflows there ("from is out of bounds");
# no one's experiment holds such numbers, so claim 11 is checked over these ranges.
RUNNABLE_AUGMENT_FIELDS: dict[type, dict[str, Any]] = AUGMENT_FIELDS | {
    C.RandomResizedCrop: {"scale": ordered_pair(1e-3, 1), "ratio": ordered_pair(1e-3, 1e3)},
    C.GaussianBlur: {"kernel_size": st.integers(0, 20).map(lambda k: 2 * k + 1), "sigma": ordered_pair(1e-3, 3)},
    C.RandomErasing: {
        "p": fraction,
        "scale": ordered_pair(0, 1),
        "ratio": ordered_pair(1e-3, 1e3) | st.tuples(st.just(0), number(0, 1e3)).map(list),  # 0: refused
    },
}

MODEL_FIELDS: dict[type, dict[str, Any]] = {
    C.ScratchCNN: {
        "channels": st.lists(st.integers(1, 512), min_size=1, max_size=6),
        "hidden": st.integers(1, 4096),
        "dropout": number(0, 1, exclude_hi=True),
        "batch_norm": st.booleans(),
    },
    C.ResNet: {
        "weights": st.one_of(st.sampled_from(["none", "imagenet"]), texts),
        "freeze_backbone": st.booleans(),
        "zero_init_residual": st.booleans(),
    },
    C.TorchvisionNet: {"weights": st.one_of(st.sampled_from(["none", "imagenet"]), texts), "freeze_backbone": st.booleans()},
}

betas = st.lists(number(0, 1, exclude_hi=True), min_size=2, max_size=2)
OPTIMIZER_FIELDS: dict[type, dict[str, Any]] = {
    C.Adam: {"lr": number(0, 10, exclude_lo=True), "betas": betas, "weight_decay": number(0, inf=True)},
    C.AdamW: {"lr": number(0, 10, exclude_lo=True), "betas": betas, "weight_decay": number(0, inf=True)},
    C.SGD: {
        "lr": number(0, 10, exclude_lo=True),
        "momentum": number(0, 1, exclude_hi=True),
        "nesterov": st.booleans(),
        "weight_decay": number(0, inf=True),
    },
}

# Below the default train.epochs (10), so a drawn warm-up is rarely refused for outlasting the run.
WARMUP_FIELDS = {"warmup_epochs": st.integers(0, 9), "warmup_start_factor": number(0, 1, exclude_lo=True)}
SCHEDULER_FIELDS: dict[type, dict[str, Any]] = {
    C.NoScheduler: WARMUP_FIELDS,
    C.StepLR: {"step_size": st.integers(1, 100), "gamma": number(0, 1, exclude_lo=True)} | WARMUP_FIELDS,
    C.CosineLR: {"eta_min": number(0, 1e-3)} | WARMUP_FIELDS,
    C.PlateauLR: {
        "monitor": st.sampled_from(["val_loss", "val_acc"]),
        "factor": number(0, 1, exclude_lo=True, exclude_hi=True),
        "patience": st.integers(0, 20),
        "min_lr": number(0, inf=True),
    } | WARMUP_FIELDS,
    C.OneCycleLR: {
        "max_lr": number(0, 10, exclude_lo=True),
        "pct_start": number(0, 1, exclude_lo=True, exclude_hi=True),
    },
}

SECTION_FIELDS: dict[type, dict[str, Any]] = {
    C.NormalizeStats: {
        "mean": st.lists(number(-2, 2), min_size=3, max_size=3),
        "std": st.lists(number(0, 2, exclude_lo=True), min_size=3, max_size=3),
    },
    C.EvaluateConfig: {"tta": st.sampled_from(["none", "flip"])},
    C.TrainConfig: {
        "epochs": st.integers(1, 1000),
        "label_smoothing": number(0, 1, exclude_hi=True),
        "class_weights": st.one_of(
            st.sampled_from(["none", "balanced"]), st.dictionaries(texts, number(0, 1e3, exclude_lo=True), max_size=3)
        ),
        "select_best": st.sampled_from(["val_loss", "val_acc"]),
        "channels_last": st.booleans(),
        "precision": st.sampled_from(["fp32", "bf16", "fp16"]),
        "clip_grad_norm": number(0, C.MAX_RATE, exclude_lo=True),
        "ema_decay": number(0, 1, exclude_lo=True, exclude_hi=True),
        "feature_cache": st.booleans(),
        "allocator": st.sampled_from(["retain", "system"]),
        "sync_batchnorm": st.sampled_from(["auto", True, False]),
    },
    C.EarlyStopping: {
        "monitor": st.sampled_from(["val_loss", "val_acc"]),
        "patience": st.integers(1, 50),
        "min_delta": number(0, 1),
    },
    C.OutputConfig: {"root": texts},
}

TAGS = {"op", "arch", "name"}


def tag_of(cls: type) -> tuple[str, str]:
    key, values = tags_of(cls)
    return key, values[0]


def tags_of(cls: type) -> tuple[str, tuple[str, ...]]:
    """The tag key and every value it takes (a variant may cover several archs)."""
    key = next(k for k in TAGS if k in cls.model_fields)
    return key, typing.get_args(cls.model_fields[key].annotation)


@st.composite
def section(draw, cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """A TOML table for one section: the tag if it has one, required fields, any subset of the rest."""
    table: dict[str, Any] = {}
    if any(k in cls.model_fields for k in TAGS):
        key, values = tags_of(cls)
        table[key] = draw(st.sampled_from(values))
    for key, strategy in fields.items():
        if cls.model_fields[key].is_required() or draw(st.booleans()):
            table[key] = draw(strategy)
    return table


def variant(fields_by_class: dict[type, dict[str, Any]]):
    return st.one_of([section(cls, fields) for cls, fields in fields_by_class.items()])


def sgd_consistent(table: dict[str, Any]) -> dict[str, Any]:
    if table.get("name") == "sgd" and table.get("nesterov") and table.get("momentum", 0.9) == 0:
        del table["nesterov"]  # nesterov needs momentum > 0: both are drawn, so drop the conflict
    return table


def augment_ops(fields=AUGMENT_FIELDS):
    return variant(fields)


def min_image_size(model: dict[str, Any]) -> int:
    return C.ScratchCNN.model_validate(model).min_image_size if model["arch"] == "scratch_cnn" else 32


def experiments():
    """Experiments as a user could write them: every variant, optional keys and sections present or not.

    Cross-field rules (augment ops that must fit the image size, eta_min <= lr) are left to the schema:
    the under 1% of drawn experiments it refuses are filtered out.
    """
    return _experiments().filter(_accepted)


def _accepted(exp: dict[str, Any]) -> bool:
    try:
        C.validate(exp)
    except ConfigError:
        return False
    return True


@st.composite
def _experiments(draw) -> dict[str, Any]:
    model = draw(variant(MODEL_FIELDS))
    dirs = draw(st.lists(texts, min_size=2, max_size=3, unique_by=os.path.normpath))
    image_size = draw(st.integers(max(8, min_image_size(model)), C.MAX_IMAGE_SIZE))
    data: dict[str, Any] = {"train_dir": dirs[0], "val_dir": dirs[1], "image_size": image_size}
    if len(dirs) == 3:
        data["test_dir"] = dirs[2]
    optional = {
        "resize_size": st.integers(image_size, min(2 * image_size, C.MAX_RESIZE_SIZE)),
        "batch_size": st.integers(2, 4096),
        "eval_batch_size": st.integers(1, 4096),
        "num_workers": st.integers(0, 64),
        "normalize": st.one_of(
            st.sampled_from(["imagenet", "half"]), section(C.NormalizeStats, SECTION_FIELDS[C.NormalizeStats])
        ),
        "on_bad_image": st.sampled_from(["fail", "skip"]),
        "leakage": st.sampled_from(["warn", "fail"]),
        "label_conflicts": st.sampled_from(["warn", "fail"]),
        "sampler": st.sampled_from(["shuffle", "balanced"]),
        "cache_dir": texts,
        "decode_workers": st.one_of(st.just("auto"), st.integers(1, C.MAX_WORKERS)),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    exp: dict[str, Any] = {
        "name": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)),
        "data": data,
        "model": model,
    }
    optional_top = {
        "seed": st.integers(0, C.MAX_SEED),
        "device": st.sampled_from(["cpu", "cuda", "auto"]),
        "augment": st.lists(augment_ops(), max_size=4),
        "optimizer": variant(OPTIMIZER_FIELDS).map(sgd_consistent),
        "scheduler": variant(SCHEDULER_FIELDS),
        "train": section(C.TrainConfig, SECTION_FIELDS[C.TrainConfig]),
        "early_stopping": section(C.EarlyStopping, SECTION_FIELDS[C.EarlyStopping]),
        "evaluate": section(C.EvaluateConfig, SECTION_FIELDS[C.EvaluateConfig]),
        "output": section(C.OutputConfig, SECTION_FIELDS[C.OutputConfig]),
    }
    for key, strategy in optional_top.items():
        if draw(st.booleans()):
            exp[key] = draw(strategy)
    if "early_stopping" in exp:  # the schema requires the early-stopping monitor to be the selection metric
        select = exp.get("train", {}).get("select_best", "val_loss")
        exp["early_stopping"]["monitor"] = select
    return exp
