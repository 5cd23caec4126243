"""The experiment schema: one TOML file is one experiment, and this module is its manual.

Imports pydantic only (never torch), so validating, dumping or diffing an experiment is instant.
Every default lives here and nowhere else; the interpreter reads fields, it never guesses them.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from imgcls.errors import ConfigError, guarded

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Range = Annotated[list[float], Field(min_length=2, max_length=2)]
# Learning rates and decay factors become float32 inside torch's optimizers, where 1e39 overflows
# ("value cannot be converted to type float"); far below that, one step already makes weights inf.
MAX_RATE = 1e3

# Upper bounds on every number that sizes memory, so an experiment that cannot fit is refused when
# the file loads, not by the operating system in epoch 1. Constants, not the machine's: a run is a
# pure function of its file. Epoch counts (epochs, step_size, patience) cost time, not memory, and
# stay unbounded; gaussian_blur.kernel_size is bounded by the side it blurs (_augment_size_problems).
MAX_IMAGE_SIZE = 2048  # ResNet18 keeps 80 MB of activations per 224-pixel image for backward; 6.6 GB at 2048
MAX_RESIZE_SIZE = 4096  # one cached 4096x4096 image is 50 MB (decoding.MAX_ASPECT times that at most)
MAX_BATCH_SIZE = 4096  # 4096 images of 224 pixels are 2.5 GB as float32, before any activation
MAX_WORKERS = 64  # each worker is a whole Python process with torch loaded (hundreds of MB)
MAX_CHANNELS = 4096  # a conv3x3 from 4096 to 4096 channels holds 151 M weights (600 MB)
MAX_HIDDEN = 65536  # Linear(4096, 65536) holds 268 M weights (1 GB)
MAX_MAGNITUDE_BINS = 256  # 8-bit images have 256 levels; torchvision builds tables this long for every image
MAX_NUM_OPS = 16  # each op is a pass over the image; RandAugment's paper uses 1 to 3
MAX_SEED = 2**32 - 1  # NumPy's global seeding takes 32 bits


def _home(path: str) -> str:
    """A leading `~` or `~user` is a home folder, as in the shell, so the resolved experiment records
    the real path; one that names no home is refused, never made a folder literally named `~`."""
    expanded = os.path.expanduser(path)
    if not expanded or expanded.startswith("~"):
        first = path.split("/", 1)[0]
        raise ValueError(f"{first!r} is no home folder (no such user, or HOME unset): write the path in full")
    return expanded


# A path the experiment names: any text, with `~` meaning home.
PathText = Annotated[str, Field(min_length=1), AfterValidator(_home)]


class Section(BaseModel):
    # strict: `true` is not a batch size and "1e-3" is not a learning rate (ints still pass as floats).
    # allow_inf_nan=False: `lr = inf` passes `gt=0` and only fails inside torch.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


def _ordered(pair: list[float], key: str) -> list[float]:
    if pair[0] > pair[1]:
        raise ValueError(f"{key} = {pair} must be [low, high] with low <= high")
    return pair


# ---------------------------------------------------------------------------------------- data


class NormalizeStats(Section):
    mean: Annotated[list[float], Field(min_length=3, max_length=3)] = Field(
        description="per-channel mean (R, G, B) of images scaled to [0, 1]"
    )
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] = Field(
        description="per-channel standard deviation (R, G, B), each > 0"
    )


Sampler = Literal["shuffle", "balanced"]


# Tagged by the value's type, so a bad count gets one error (the count's), not one per branch.
DecodeWorkers = Annotated[
    Union[Annotated[int, Field(ge=1, le=MAX_WORKERS), Tag("count")], Annotated[Literal["auto"], Tag("auto")]],
    Discriminator(lambda v: "auto" if isinstance(v, str) else "count"),
]


class DataConfig(Section):
    train_dir: PathText = Field(description="training images: one sub-folder per class (ImageFolder); ~ is home")
    val_dir: PathText = Field(description="validation images, same layout; labelled with train's classes")
    test_dir: PathText | None = Field(None, description="optional test images, same layout")
    image_size: int = Field(
        224, ge=8, le=MAX_IMAGE_SIZE, description=f"side of the square image the model sees, in pixels (8..{MAX_IMAGE_SIZE})"
    )
    resize_size: int | None = Field(
        None,
        ge=8,
        le=MAX_RESIZE_SIZE,
        description="shorter side, in pixels, each image is resized to when decoded; evaluation centre-crops "
        f"image_size from it (default: image_size * 8/7, torchvision's 256 for 224; at most {MAX_RESIZE_SIZE})",
    )
    batch_size: int = Field(
        32,
        ge=2,
        le=MAX_BATCH_SIZE,
        description=f"training images per optimizer step (2..{MAX_BATCH_SIZE}: a batch of one is dropped, "
        "BatchNorm cannot train on it)",
    )
    eval_batch_size: int = Field(
        128,
        ge=1,
        le=MAX_BATCH_SIZE,
        description=f"images per forward pass when evaluating or predicting (1..{MAX_BATCH_SIZE})",
    )
    num_workers: int = Field(
        0, ge=0, le=MAX_WORKERS,
        description=f"DataLoader worker processes (0: load in the main process; at most {MAX_WORKERS}); results are "
        "the same for any number. 0 by default: on 2 cores, workers only took time from the training step "
        "(bench/README.md, workers); raise it where cores are spare, e.g. beside a GPU",
    )
    cache_dir: PathText = Field(
        "~/.cache/imgcls",
        description="folder of decoded-image caches (one file per split and resize_size, named by the files' "
        "SHA-256s), reused by every run, resume and evaluate over the same files; delete it to free the space",
    )
    decode_workers: DecodeWorkers = Field(
        "auto",
        description=f'processes that decode images when a cache is built ("auto": one per CPU this process may use; '
        f"at most {MAX_WORKERS}); the cache's bytes are the same for any number",
    )
    normalize: Literal["imagenet", "half"] | NormalizeStats = Field(
        "imagenet",
        description='"imagenet" (torchvision\'s mean/std), "half" (mean = std = 0.5), or { mean = [..], std = [..] }',
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description='unreadable images: "fail" stops before training, "skip" leaves them out (listed either way)'
    )
    leakage: Literal["warn", "fail"] = Field(
        "warn",
        description="copies of training images in val/test (byte-identical, or re-encoded/resized: perceptual "
        "hash within a few bits): warn, or fail the run",
    )
    label_conflicts: Literal["warn", "fail"] = Field(
        "warn", description="one photo (byte-identical or perceptually so) under two classes: warn, or fail the run"
    )
    sampler: Sampler = Field(
        "shuffle",
        description='how training batches are drawn: "shuffle" (each image once per epoch) or "balanced" (as many '
        "draws as training images, with replacement, each class equally likely, each repeat augmented anew); "
        "a pure function of (seed, epoch) either way. val/test are read in file order",
    )

    @model_validator(mode="after")
    def _resolve(self) -> DataConfig:
        if self.resize_size is None:
            self.resize_size = round(self.image_size * 8 / 7)
        return self


def _data_problems(data: DataConfig) -> list[str]:
    problems = []
    if data.resize_size < data.image_size:
        problems.append(
            f"data.resize_size = {data.resize_size} is smaller than data.image_size = {data.image_size}: "
            "evaluation centre-crops image_size out of the resized image"
        )
    seen: dict[str, str] = {}
    for key in ("train_dir", "val_dir", "test_dir"):
        value = getattr(data, key)
        if value is None:
            continue
        norm = os.path.normpath(value)
        if norm in seen:
            problems.append(f"data.{key} and data.{seen[norm]} are the same folder ({value!r}): splits must be separate")
        seen[norm] = key
    return problems


# ---------------------------------------------------------------------------------- augmentation


class RandomResizedCrop(Section):
    op: Literal["random_resized_crop"]
    scale: Range = Field([0.08, 1.0], description="range of the crop's area as a fraction of the image")
    ratio: Range = Field([3 / 4, 4 / 3], description="range of the crop's aspect ratio (width / height)")

    @model_validator(mode="after")
    def _check(self) -> RandomResizedCrop:
        _ordered(self.scale, "scale")
        _ordered(self.ratio, "ratio")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale = {self.scale} must lie in (0, 1]")
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio = {self.ratio} must be positive")
        return self


class RandomCrop(Section):
    op: Literal["random_crop"]
    padding: int = Field(
        0,
        ge=0,
        le=MAX_IMAGE_SIZE,  # a border wider than the largest crop is blank pixels only
        description=f"pixels added on each border before cropping image_size (at most {MAX_IMAGE_SIZE})",
    )
    padding_mode: Literal["constant", "edge", "reflect", "symmetric"] = Field(
        "constant", description="how the padding is filled"
    )


class Resize(Section):
    op: Literal["resize"]
    size: int = Field(ge=8, le=MAX_RESIZE_SIZE, description=f"shorter side after resizing, in pixels (8..{MAX_RESIZE_SIZE})")


class HorizontalFlip(Section):
    op: Literal["horizontal_flip"]
    p: Fraction = Field(0.5, description="probability of flipping left-right")


class VerticalFlip(Section):
    op: Literal["vertical_flip"]
    p: Fraction = Field(0.5, description="probability of flipping upside down")


class Rotation(Section):
    op: Literal["rotation"]
    degrees: float = Field(ge=0, le=180, description="rotate by a uniform angle in [-degrees, degrees]")


class ColorJitter(Section):
    op: Literal["color_jitter"]
    brightness: float = Field(0.0, ge=0, description="brightness factor drawn from [1 - b, 1 + b]")
    contrast: float = Field(0.0, ge=0, description="contrast factor drawn from [1 - c, 1 + c]")
    saturation: float = Field(0.0, ge=0, description="saturation factor drawn from [1 - s, 1 + s]")
    hue: float = Field(0.0, ge=0, le=0.5, description="hue shift drawn from [-h, h], in turns")


class Grayscale(Section):
    op: Literal["grayscale"]
    p: Fraction = Field(0.1, description="probability of converting to grey (kept as 3 channels)")


class GaussianBlur(Section):
    op: Literal["gaussian_blur"]
    kernel_size: int = Field(3, ge=1, description="odd kernel side, in pixels")
    sigma: Range = Field([0.1, 2.0], description="range of the blur's standard deviation, in pixels")

    @model_validator(mode="after")
    def _check(self) -> GaussianBlur:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size = {self.kernel_size} must be odd")
        if _ordered(self.sigma, "sigma")[0] < 0.001:  # torch rounds a smaller draw to 0.0, which it refuses
            raise ValueError(f"sigma = {self.sigma} must be at least 0.001 pixels")
        return self


class TrivialAugment(Section):
    op: Literal["trivial_augment"]
    num_magnitude_bins: int = Field(
        31,
        ge=2,
        le=MAX_MAGNITUDE_BINS,
        description=f"number of magnitude levels (TrivialAugmentWide; 2..{MAX_MAGNITUDE_BINS})",
    )


class RandAugment(Section):
    op: Literal["rand_augment"]
    num_ops: int = Field(2, ge=1, le=MAX_NUM_OPS, description=f"operations applied to each image (1..{MAX_NUM_OPS})")
    magnitude: int = Field(9, ge=0, le=30, description="strength of each operation, 0..30")


class RandomErasing(Section):
    op: Literal["random_erasing"]
    p: Fraction = Field(0.5, description="probability of erasing a rectangle")
    scale: Range = Field([0.02, 0.33], description="range of the erased area as a fraction of the image")
    ratio: Range = Field([0.3, 3.3], description="range of the erased rectangle's aspect ratio")

    @model_validator(mode="after")
    def _check(self) -> RandomErasing:
        _ordered(self.scale, "scale")
        if _ordered(self.ratio, "ratio")[0] <= 0:
            raise ValueError(f"ratio = {self.ratio} must be positive")  # torchvision takes its log
        return self


Augment = Annotated[
    Union[
        RandomResizedCrop,
        RandomCrop,
        Resize,
        HorizontalFlip,
        VerticalFlip,
        Rotation,
        ColorJitter,
        Grayscale,
        GaussianBlur,
        TrivialAugment,
        RandAugment,
        RandomErasing,
    ],
    Field(discriminator="op"),
]

# ---------------------------------------------------------------------------------------- model


class ScratchCNN(Section):
    arch: Literal["scratch_cnn"]
    # The number of blocks needs no bound of its own: image_size must be at least 2 ** blocks.
    channels: Annotated[list[Annotated[int, Field(ge=1, le=MAX_CHANNELS)]], Field(min_length=1)] = Field(
        [32, 64, 128],
        description=f"output channels of each conv3x3 -> ReLU -> MaxPool(2) block (each 1..{MAX_CHANNELS})",
    )
    hidden: int = Field(
        128, ge=1, le=MAX_HIDDEN, description=f"width of the hidden layer of the classifier head (1..{MAX_HIDDEN})"
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout probability before the last layer")
    batch_norm: bool = Field(False, description="BatchNorm after each convolution")

    @property
    def min_image_size(self) -> int:
        return 2 ** len(self.channels)  # each MaxPool(2) floors the side by half


class _Torchvision(Section):
    """A torchvision classifier whose last layer is replaced by a new head for the experiment's classes."""

    arch: str  # narrowed to the variant's names below; declared here so it stays the table's first key
    weights: PathText = Field(
        "imagenet",
        description='"none" (random init), "imagenet" (torchvision\'s ImageNet weights for the arch, listed under '
        '"Backbones" in README.md), or a path to a state dict (.pth/.safetensors) or an imgcls checkpoint',
    )
    freeze_backbone: bool = Field(False, description="train only the new head; backbone weights and BatchNorm stats stay fixed")

    @property
    def min_image_size(self) -> int:
        return 32  # total stride of every arch here; smaller inputs leave BatchNorm single-pixel maps


class ResNet(_Torchvision):
    arch: Literal["resnet18", "resnet34", "resnet50"]
    zero_init_residual: bool = Field(
        False,
        description="start each residual branch's last BatchNorm weight at zero, so every block begins as the "
        'identity (Goyal et al. 2017); only with weights = "none". Off by default: over 3 seeds on the groceries '
        "photos it did not raise accuracy (README, Backbones; bench/zero_init.py)",
    )

    @model_validator(mode="after")
    def _zero_init_needs_no_weights(self) -> ResNet:
        if self.zero_init_residual and self.weights != "none":
            raise ValueError(
                f"zero_init_residual = true only shapes a random initialisation, but weights = {self.weights!r} "
                'replace it: set weights = "none" or zero_init_residual = false'
            )
        return self


class TorchvisionNet(_Torchvision):
    arch: Literal["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


Model = Annotated[Union[ScratchCNN, ResNet, TorchvisionNet], Field(discriminator="arch")]

# ------------------------------------------------------------------------------------ optimizer

Betas = Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]


class Adam(Section):
    name: Literal["adam"]
    lr: float = Field(1e-3, gt=0, le=MAX_RATE, description="learning rate")
    betas: Betas = Field([0.9, 0.999], description="coefficients of the running averages of gradient and its square")
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE, description="L2 penalty added to the gradient")


class AdamW(Section):
    name: Literal["adamw"]
    lr: float = Field(1e-3, gt=0, le=MAX_RATE, description="learning rate")
    betas: Betas = Field([0.9, 0.999], description="coefficients of the running averages of gradient and its square")
    weight_decay: float = Field(0.01, ge=0, le=MAX_RATE, description="decoupled weight decay")


class SGD(Section):
    name: Literal["sgd"]
    lr: float = Field(0.01, gt=0, le=MAX_RATE, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum factor, in [0, 1)")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE, description="L2 penalty added to the gradient")

    @model_validator(mode="after")
    def _check(self) -> SGD:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0")
        return self


Optimizer = Annotated[Union[Adam, AdamW, SGD], Field(discriminator="name")]

# ------------------------------------------------------------------------------------ scheduler


# Warm-up, shared by every epoch-stepped scheduler (onecycle has its own: pct_start). As torch's
# SequentialLR(LinearLR, schedule): the schedule proper counts its epochs from the end of the warm-up.
WarmupEpochs = Annotated[
    int,
    Field(ge=0, description="epochs of linear warm-up from warmup_start_factor * lr to lr; the schedule proper "
          "starts after them and counts its epochs from there (0: no warm-up; less than train.epochs)"),
]
WarmupStartFactor = Annotated[
    float, Field(gt=0, le=1, description="fraction of the learning rate the warm-up's first epoch uses, in (0, 1]")
]


class NoScheduler(Section):
    name: Literal["none"]
    warmup_epochs: WarmupEpochs = 0
    warmup_start_factor: WarmupStartFactor = 0.1


class StepLR(Section):
    name: Literal["step"]
    step_size: int = Field(10, ge=1, description="epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="factor applied to the learning rate at each decay")
    warmup_epochs: WarmupEpochs = 0
    warmup_start_factor: WarmupStartFactor = 0.1


class CosineLR(Section):
    name: Literal["cosine"]
    eta_min: float = Field(0.0, ge=0, le=MAX_RATE, description="learning rate the cosine anneals towards, reached after the last epoch")
    warmup_epochs: WarmupEpochs = 0
    warmup_start_factor: WarmupStartFactor = 0.1


class PlateauLR(Section):
    name: Literal["plateau"]
    monitor: Literal["val_loss", "val_acc"] = Field("val_loss", description="metric that must improve")
    factor: float = Field(0.1, gt=0, lt=1, description="factor applied to the learning rate on a plateau")
    patience: int = Field(2, ge=0, description="epochs without improvement before decaying")
    min_lr: float = Field(0.0, ge=0, le=MAX_RATE, description="lower bound on the learning rate")
    warmup_epochs: WarmupEpochs = 0
    warmup_start_factor: WarmupStartFactor = 0.1


class OneCycleLR(Section):
    name: Literal["onecycle"]
    max_lr: float = Field(gt=0, le=MAX_RATE, description="peak learning rate, reached after pct_start of all steps")
    pct_start: float = Field(0.3, gt=0, lt=1, description="fraction of the steps spent increasing the learning rate")

    @model_validator(mode="before")
    @classmethod
    def _own_warmup(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"warmup_epochs", "warmup_start_factor"} & data.keys()):
            raise ValueError(
                "onecycle warms up by itself (pct_start of the steps); remove warmup_epochs / warmup_start_factor "
                "or pick another scheduler"
            )
        return data


Scheduler = Annotated[
    Union[NoScheduler, StepLR, CosineLR, PlateauLR, OneCycleLR], Field(discriminator="name")
]

# ------------------------------------------------------------------------------ train and output


ClassWeight = Annotated[float, Field(gt=0, le=MAX_RATE)]  # scales the loss's gradient as lr scales the step
# Tagged by the value's type, so a bad value gets one error (the branch it meant), not one per branch.
ClassWeights = Annotated[
    Union[Annotated[Literal["none", "balanced"], Tag("name")], Annotated[dict[str, ClassWeight], Tag("table")]],
    Discriminator(lambda v: "table" if isinstance(v, dict) else "name"),
]


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, description="passes over the training set (fewer if early stopping fires)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="CrossEntropyLoss label smoothing")
    class_weights: ClassWeights = Field(
        "none",
        description='weights of the training loss per class (weighted cross-entropy): "none"; "balanced" '
        "(n_images / (n_classes * images of the class), from the training split, as scikit-learn); or a table "
        "{ class name = weight > 0 }, classes not named weigh 1.0. A batch's loss is the weighted mean (torch's "
        "CrossEntropyLoss(weight)); the validation loss stays unweighted",
    )
    select_best: Literal["val_loss", "val_acc"] = Field(
        "val_loss", description="metric that picks the best checkpoint (must equal early_stopping.monitor)"
    )
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions on CPU and GPU)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description='"bf16" autocasts the forward pass (faster on recent CPUs/GPUs, not bit-identical to fp32); '
        '"fp16" autocasts to float16 with a gradient scaler (torch.amp.GradScaler), CUDA only',
    )
    clip_grad_norm: float | None = Field(
        None,
        gt=0,
        le=MAX_RATE,
        description="clip the global L2 norm of the trainable parameters' gradients to this value before each "
        "step (after fp16 unscaling); absent: no clipping",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights "
        "after every optimizer step (e.g. 0.999), and validate, select `best`, evaluate and predict with it; "
        "absent: no average",
    )
    feature_cache: bool = Field(
        True,
        description="frozen backbone and no augmentation: compute its features once per split and train the head "
        "on them (same result, each later epoch costs only the head); otherwise the frozen backbone runs without autograd",
    )
    sync_batchnorm: Literal["auto"] | bool = Field(
        "auto",
        description='under torchrun with several processes, BatchNorm normalises with the statistics of the global '
        'batch (all ranks), as one process would: "auto" (on when there is more than one process), true or false '
        "(each rank's own slice: faster, not what one process computes). No effect in one process",
    )
    allocator: Literal["retain", "system"] = Field(
        "retain",
        description='"retain": glibc keeps freed memory for reuse instead of returning large blocks to the OS after '
        'every step (2.1x for the bare scratch CNN @128 on the 2-core reference machine: `python -m bench allocator`); '
        '"system": the C library\'s defaults. Never changes results',
    )


FP16_ON_CPU = (
    'train.precision = "fp16" needs a CUDA device (its gradient scaler exists for float16\'s narrow range on GPUs), '
    'but the run is on the CPU: use "bf16" (also half the bits, with fp32\'s range) or "fp32"'
)


class EarlyStopping(Section):
    monitor: Literal["val_loss", "val_acc"] = Field("val_loss", description="metric watched after each epoch")
    patience: int = Field(3, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")


Tta = Literal["none", "flip"]


class EvaluateConfig(Section):
    tta: Tta = Field(
        "none",
        description='test-time augmentation of the run\'s final val/test evaluation, evaluate and predict: "none" '
        '(the centre crop); "flip" (the mean of the logits, not the probabilities, of the centre crop and its '
        "horizontal mirror: two forward passes). Per-epoch validation never uses it",
    )


class OutputConfig(Section):
    root: PathText = Field("runs", description="folder that holds run directories (<root>/<name>); ~ is home")


class Experiment(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=200,  # file systems refuse names over 255 bytes; leave room for temp-file prefixes
        description="run name; the run directory is <output.root>/<name>",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description=f"seeds weights, shuffling and augmentation (0..{MAX_SEED})"
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description='"auto" picks cuda when available; the run records the resolved value'
    )
    data: DataConfig = Field(description="where the images are and how they are batched")
    augment: list[Augment] = Field([], description="training-time augmentations, applied in order")
    model: Model = Field(description="the network")
    optimizer: Optimizer = Field({"name": "adam"}, description="optimizer and its settings")
    scheduler: Scheduler = Field({"name": "none"}, description="learning-rate schedule")
    train: TrainConfig = Field({}, description="training loop settings")
    early_stopping: EarlyStopping | None = Field(None, description="stop when the monitor stops improving; absent: run all epochs")
    evaluate: EvaluateConfig = Field({}, description="how the trained model is evaluated and used")
    output: OutputConfig = Field({}, description="where results are written")

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        problems = _data_problems(self.data)
        if self.data.image_size < self.model.min_image_size:
            problems.append(
                f"data.image_size = {self.data.image_size} is too small for model.arch = {self.model.arch!r}: "
                f"it needs at least {self.model.min_image_size}"
            )
        if self.train.precision == "fp16" and self.device == "cpu":
            problems.append(FP16_ON_CPU)
        if self.early_stopping and self.early_stopping.monitor != self.train.select_best:
            problems.append(
                f"early_stopping.monitor = {self.early_stopping.monitor!r} but train.select_best = "
                f"{self.train.select_best!r}: set both to the same metric"
            )
        if isinstance(self.scheduler, CosineLR) and self.scheduler.eta_min > self.optimizer.lr:
            problems.append(
                f"scheduler.eta_min = {self.scheduler.eta_min} is above optimizer.lr = {self.optimizer.lr}: "
                "cosine annealing would raise the learning rate; set eta_min <= lr"
            )
        if not isinstance(self.scheduler, OneCycleLR) and self.scheduler.warmup_epochs >= self.train.epochs:
            problems.append(
                f"scheduler.warmup_epochs = {self.scheduler.warmup_epochs} must be less than train.epochs = "
                f"{self.train.epochs}: the schedule needs at least one epoch after the warm-up"
            )
        problems += _augment_size_problems(self.augment, self.data)
        if problems:
            raise ValueError(_SEPARATE.join(problems))
        return self


def _augment_size_problems(ops: list[Augment], data: DataConfig) -> list[str]:
    """Ops that torchvision cannot apply to the images they receive, found before any image is read.

    Without this the run fails in epoch 1 inside a DataLoader worker with a torch padding error.
    `side` is the shorter side entering each op: resize_size after decoding, then changed by crops
    and resizes. Reflect padding must be narrower than the side (symmetric: at most the side).
    """
    problems, side = [], data.resize_size
    for i, op in enumerate(ops):
        match op:
            case GaussianBlur() if op.kernel_size // 2 >= side:
                problems.append(
                    f"augment[{i}].kernel_size = {op.kernel_size} is too large for the {side}-pixel side it "
                    f"blurs: use at most {2 * side - 1}"
                )
            case RandomCrop() if op.padding_mode in ("reflect", "symmetric"):
                pad = op.padding + max(0, data.image_size - side - 2 * op.padding)  # + pad_if_needed's share
                if pad > side or (pad == side and op.padding_mode == "reflect"):
                    problems.append(
                        f"augment[{i}]: padding_mode = {op.padding_mode!r} cannot pad {pad} pixels onto the "
                        f"{side}-pixel side it receives; lower padding or use \"constant\" or \"edge\""
                    )
            case RandomResizedCrop() if op.ratio[0] > side or op.ratio[1] < 1 / side:
                problems.append(
                    f"augment[{i}].ratio = {op.ratio} can give crops less than a pixel wide on the {side}-pixel "
                    f"side it receives: the range must reach into [1/{side}, {side}]"
                )
        match op:
            case RandomResizedCrop() | RandomCrop():
                side = data.image_size
            case Resize():
                side = op.size
    return problems


# -------------------------------------------------------------------------------- load and dump


# Cross-field checks raise one ValueError; each problem in it names its own keys and becomes a line.
_SEPARATE = "\n<next>"


def validate(data: dict[str, Any], source: str = "<experiment>") -> Experiment:
    """Validate a parsed experiment, or raise ConfigError listing every problem with its key path.

    pydantic checks cross-field rules only once every field is valid, so a file with a typo and
    a contradiction would report them one edit apart. The contradictions hidden behind field
    errors are found by validating again with the bad keys removed (their defaults apply).
    """
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        problems = _problem_lines(e.errors())
        problems += [p for p in _hidden_problems(data, e.errors()) if p not in problems]
        raise ConfigError(source, problems) from None


def _problem_lines(errors: list[dict[str, Any]]) -> list[str]:
    return [line for err in errors for line in _describe(err).split(_SEPARATE)]


def _hidden_problems(data: dict[str, Any], errors: list[dict[str, Any]]) -> list[str]:
    """Whole-table problems that the field errors kept pydantic from checking.

    A problem that names a removed key is left out: it would be about the default that stood in
    for the user's value, not about the file.
    """
    repaired, removed, found = copy.deepcopy(data), set(), []
    for _ in range(4):  # each round can uncover one more level of nested tables
        if not [err for err in errors if _remove(repaired, err, removed)]:
            break
        try:
            Experiment.model_validate(repaired)
            break
        except ValidationError as e:
            errors = e.errors()
        found += [p for p in _problem_lines(errors) if not any(_mentions(p, key) for key in removed)]
    return found


def _remove(tree: dict[str, Any], err: dict[str, Any], removed: set[str]) -> bool:
    """Delete the key (or list item) an error is about, where its table gives it a default."""
    key, parent, raw, whole_table = _key_path(err["loc"])
    if whole_table and raw and isinstance(raw[-1], int):  # an unusable list item, e.g. an unknown op
        key, raw = key.rpartition("[")[0], raw[:-1]
    elif whole_table or parent is None or not raw:
        return False
    while isinstance(raw[-1], int):  # a bad item of a list of numbers: the whole list goes
        key, raw = key.rpartition("[")[0], raw[:-1]
    field = parent.model_fields.get(str(raw[-1])) if parent else None
    if field is not None and field.is_required():
        return False  # nothing to fall back on
    node: Any = tree
    for part in raw[:-1]:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    if isinstance(node, dict) and raw[-1] in node:
        del node[raw[-1]]
        removed.add(key)
        return True
    return False


def _has(node: dict | list, part: str | int) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and part < len(node)


def _mentions(problem: str, key: str) -> bool:
    """Whether a problem line is about `key` (a table-level rule names its keys without the table)."""
    table, _, leaf = key.rpartition(".")
    leaf = leaf.split("[")[0]
    return key.split("[")[0] in problem or (problem.startswith(f"{table}:") and re.search(rf"\b{re.escape(leaf)}\b", problem) is not None)


def load(path: str | os.PathLike, *, check_paths: bool = False) -> Experiment:
    """Read and validate an experiment file. With check_paths, the folders and files it names are
    checked too (path_problems), and every problem of either kind comes in one report."""
    source = str(path)
    data = read(path)
    try:
        exp = validate(data, source)
    except ConfigError as e:
        raise ConfigError(source, e.problems + (path_problems(data) if check_paths else [])) from None
    problems = path_problems(exp.model_dump(mode="json")) if check_paths else []
    if problems:
        raise ConfigError(source, problems)
    return exp


def read(path: str | os.PathLike) -> dict[str, Any]:
    """An experiment file's TOML tree, not yet validated (a sweep edits it first)."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(source, [f"cannot read the experiment file: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not UTF-8 text (byte {e.start}); save the file as UTF-8"]) from None
    return _parse(text, source)


def loads(text: str, source: str = "<experiment>") -> Experiment:
    return validate(_parse(text, source), source)


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"invalid TOML: {e}"]) from None


def to_toml(exp: Experiment) -> str:
    """Canonical TOML: every default filled in, keys in schema order, absent options omitted.

    One layout whatever the content, so `diff` of two runs' config.toml shows values, not
    formatting: the augment list is always one inline table per line (tomli_w alone switches
    to [[augment]] tables when a line grows long), every other list one item per line.
    """
    tree = exp.model_dump(mode="json", exclude_none=True)
    top = {k: v for k, v in tree.items() if not isinstance(v, (dict, list))}
    tables = {k: v for k, v in tree.items() if isinstance(v, dict)}
    ops = "".join(f"    {_inline_toml(op)},\n" for op in tree["augment"])
    header = f"# resolved experiment; keys that cannot change results: {', '.join(sorted(RESULT_NEUTRAL))}\n"
    return header + tomli_w.dumps(top) + f"augment = [\n{ops}]\n\n" + tomli_w.dumps(tables)


def _inline_toml(value: Any) -> str:
    """A value on one line, scalars written by tomli_w so strings and floats round-trip exactly."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_inline_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_inline_toml(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


# Folders that are never classes: hidden ones, and the resource forks a macOS zip carries.
JUNK_DIRS = {"__macosx"}


def is_hidden_dir(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_DIRS


def class_folders(root: str) -> list[str]:
    """Class folder names in sorted order, as ImageFolder; hidden folders are never classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden_dir(e.name))


def path_problems(tree: dict[str, Any]) -> list[str]:
    """What the folders and files an experiment names must hold, checked without reading an image:
    the data folders exist, the weights file exists, the run directory can be created and written.

    Takes the parsed (or dumped) experiment, so the checks also run beside schema errors (a parsed
    path's `~` is expanded here as the schema would).
    """
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    problems, classes, seen = [], {}, {}
    for key in ("train_dir", "val_dir", "test_dir"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue
        value = os.path.expanduser(value)
        if not Path(value).is_dir():
            problems.append(f"data.{key}: folder {value!r} does not exist (relative paths start at {os.getcwd()})")
            continue
        same = [k for k, v in seen.items() if os.path.samefile(v, value)]  # e.g. through a link
        if same:
            problems.append(f"data.{key} and data.{same[0]} are the same folder ({value!r}): splits must be separate")
        seen[key] = value
        classes[key] = class_folders(value)
        if not classes[key]:
            problems.append(f"data.{key}: folder {value!r} holds no class folders (expected one sub-folder per class)")
    for key in ("val_dir", "test_dir"):
        unknown = [c for c in classes.get(key, []) if "train_dir" in classes and c not in classes["train_dir"]]
        if unknown:
            problems.append(
                f"data.{key}: class folder(s) {unknown} are not in data.train_dir's classes; labels follow "
                "train's folders, so add them to train or remove them here"
            )
    train = tree.get("train") if isinstance(tree.get("train"), dict) else {}
    if isinstance(train.get("class_weights"), dict) and classes.get("train_dir"):
        problems += class_weight_problems(train["class_weights"], classes["train_dir"])
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    weights = model.get("weights")
    if isinstance(weights, str) and weights not in ("none", "imagenet", "") and not Path(os.path.expanduser(weights)).is_file():
        problems.append(f"model.weights: file {weights!r} does not exist; use \"none\", \"imagenet\" or a path")
    cache_dir = data.get("cache_dir", DataConfig.model_fields["cache_dir"].default)
    if isinstance(cache_dir, str) and cache_dir and (problem := _unwritable(Path(os.path.expanduser(cache_dir)))):
        problems.append(f"data.cache_dir: {problem.replace('no run directory', 'no decoded cache')}")
    output = tree.get("output") if isinstance(tree.get("output"), dict) else {}
    root = output.get("root", OutputConfig.model_fields["root"].default)
    if isinstance(root, str) and root:
        name = tree.get("name")
        run_dir = Path(os.path.expanduser(root)) / (name if isinstance(name, str) and "/" not in name else "")
        problem = _unwritable(run_dir)
        if problem:
            problems.append(f"output.root: {problem}")
    return problems


def class_weight_problems(weights: dict[str, float], classes: list[str]) -> list[str]:
    """Names in a train.class_weights table that are not training classes (folder names, case-sensitive)."""
    return [
        f"train.class_weights: {name!r} is not a training class; the classes are {classes}"
        for name in weights
        if name not in classes
    ]


def _unwritable(folder: Path) -> str | None:
    """Why `folder` (to be created, or written in) cannot be, found before any image is decoded and
    without writing anything: the nearest part of its path that exists must be a folder this
    process may create entries in."""
    existing = Path(os.path.abspath(folder))
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {str(folder)!r}: {str(existing)!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return f"cannot write in {str(existing)!r} (permission denied or a read-only file system), so no run directory can be made there"
    return None


# ------------------------------------------------------------------------ comparing experiments

# Keys that cannot change a run's numbers, so a resume may change them: workers only move work
# around (augmentation is keyed by sample, the cache's bytes are fixed by the file list), the
# folders only say where the run directory and the decoded caches live, and the allocator only
# decides when freed memory goes back to the OS.
RESULT_NEUTRAL = frozenset({"data.num_workers", "data.decode_workers", "data.cache_dir", "output.root", "train.allocator"})


# Keys that decide what a trained model answers for an image: the network, the eval preprocessing
# and the numeric path. Inference takes them from the checkpoint and refuses an experiment that differs.
PREDICTION_KEYS = ("model", "data.image_size", "data.resize_size", "data.normalize", "train.precision", "train.channels_last")


def changes_predictions(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in PREDICTION_KEYS)


def changed_keys(before: Experiment, after: Experiment) -> list[str]:
    """Key paths whose values differ, in schema order (a key absent on one side counts)."""
    return differing_keys(before.model_dump(mode="json"), after.model_dump(mode="json"))


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [k for key in keys for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def describe_changes(before: Experiment, after: Experiment, keys: list[str], names: tuple[str, str]) -> str:
    """One line per differing key path: `  - model.channels: [8, 16] (run) vs [8, 32] (now)`."""
    a, b = before.model_dump(mode="json"), after.model_dump(mode="json")

    def value(tree: Any, key: str) -> str:
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        text = "absent" if tree is None else json.dumps(tree)
        return text if len(text) <= 80 else text[:77] + "..."

    return "\n".join(f"  - {k}: {value(a, k)} ({names[0]}) vs {value(b, k)} ({names[1]})" for k in keys)


# ------------------------------------------------------------------------- readable error messages


def _describe(err: dict[str, Any]) -> str:
    key, model, _, _ = _key_path(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        leaf = str(err["loc"][-1])
        message = "unknown key"
        if model is not None:
            close = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(model.model_fields)}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = err["ctx"]["discriminator"].strip("'")
        key = f"{key}.{discriminator}"
        if kind == "union_tag_not_found":
            message = "required key is missing: it picks the variant (see the reference in README.md)"
        else:
            message = f"{err['ctx']['tag']!r} is not one of {err['ctx']['expected_tags']}"
    else:
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], dict):
            message += f" (got {_inline(err['input'])})"
    if not key:  # cross-field problems name their keys themselves
        return message
    return f"{key}: {message}"


def _key_path(loc: tuple) -> tuple[str, type[BaseModel] | None, list[str | int], bool]:
    """Render pydantic's loc as a TOML key path, dropping union tags, e.g. augment[0].p.

    Also returns the model class that holds the last key, so unknown keys can suggest a valid one,
    the path in the parsed TOML, and whether the loc names a whole table (a table-level rule).
    """
    parts: list[str] = []
    raw: list[str | int] = []
    annotation: Any = Experiment
    parent: type[BaseModel] | None = None
    for item in loc:
        annotation = _strip(annotation)
        if isinstance(item, int):
            parts.append(f"[{item}]")
            raw.append(item)
            annotation = typing.get_args(annotation)[0] if typing.get_args(annotation) else None
            continue
        members = _union_members(annotation)
        if item in _member_tags(annotation):  # a Tag of a union discriminated by a function: not a TOML key
            annotation = _member_tags(annotation)[item]
            continue
        if members and not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            tagged = [m for m in members if item in _tags_of(m)]
            if tagged:  # a discriminator value: part of pydantic's loc, not of the TOML key
                annotation = tagged[0]
                continue
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            annotation = models[0] if len(models) == 1 else annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            parent = annotation
            field = annotation.model_fields.get(item)
            annotation = field.annotation if field else None
        else:
            parent, annotation = None, None
        raw.append(item)
        parts.append(("." if parts else "") + str(item))
    whole_table = bool(_tags_of(annotation)) or (isinstance(annotation, type) and issubclass(annotation, BaseModel))
    whole_table = whole_table or any(_tags_of(m) for m in _union_members(_strip(annotation)))
    return "".join(parts), parent, raw, whole_table


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _member_tags(annotation: Any) -> dict[str, Any]:
    """{tag: member} for a union whose members carry pydantic Tags (e.g. train.class_weights)."""
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return {}
    tags = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is Annotated:
            tags |= {m.tag: _strip(member) for m in member.__metadata__ if isinstance(m, Tag)}
    return tags


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [_strip(a) for a in typing.get_args(annotation)]
    return []


def _tags_of(model: Any) -> tuple[str, ...]:
    """The discriminator values a variant answers to (one per arch name a variant covers), or ()."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ()
    for key in ("op", "arch", "name"):
        field = model.model_fields.get(key)
        if field is not None and typing.get_origin(field.annotation) is Literal:
            return typing.get_args(field.annotation)
    return ()


# --------------------------------------------------------------------------- reference document


def reference() -> str:
    """The README's reference section, generated from the schema so the two cannot drift."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, skip: str | None = None) -> None:
        for name, field in model.model_fields.items():
            if name == skip:
                continue
            key = f"{prefix}{name}"
            annotation = _strip(field.annotation)
            is_list = typing.get_origin(annotation) is list
            inner = _strip(typing.get_args(annotation)[0]) if is_list else annotation
            members = _union_members(inner) or [inner]
            variants = [m for m in members if _tags_of(m)]
            tables = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and m not in variants]
            rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
            for variant in variants:
                tag_key = next(k for k in ("op", "arch", "name") if k in variant.model_fields)
                tags = " \\| ".join(f'"{t}"' for t in _tags_of(variant))
                walk(variant, f"{key}[{tag_key}={tags}].", skip=tag_key)
            for table in tables:
                walk(table, f"{key}.")

    walk(Experiment, "")
    return "\n".join(rows) + "\n"


def _type_name(annotation: Any) -> str:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(annotation))
    members = _union_members(annotation)
    if members and all(_tags_of(m) for m in members):
        tag_key = next(k for k in ("op", "arch", "name") if k in members[0].model_fields)
        return f"table chosen by `{tag_key}`"
    if members:
        return " \\| ".join(_type_name(m) for m in members)
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if typing.get_origin(annotation) is dict:
        key, value = typing.get_args(annotation)
        return f"table of {_type_name(key)} = {_type_name(value)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "absent")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default is None:
        return "absent"
    return f"`{_inline(field.default)}`"


def _inline(value: Any) -> str:
    """A TOML value on one line (tomli_w spreads arrays over several)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m imgcls.config EXPERIMENT.toml | --reference", file=sys.stderr)
        return 2

    def go() -> int:
        print(reference() if argv == ["--reference"] else to_toml(load(argv[0], check_paths=True)), end="")
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
