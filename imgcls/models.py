"""Models: a backbone that maps images to a feature vector, and a head that maps it to logits.

Models return logits (no softmax): CrossEntropyLoss applies log_softmax itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from typing_extensions import assert_never

from imgcls import checkpoint, provenance
from imgcls import config as C
from imgcls.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

class Classifier(nn.Module):
    """backbone -> head. A frozen backbone stays in eval mode, so BatchNorm statistics never move."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_backbone: bool = False):
        super().__init__()
        self.backbone, self.head, self.freeze_backbone = backbone, head, freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():  # no autograd bookkeeping for a backbone that never trains
                features = self.backbone(x)
            return self.head(features)
        return self.head(self.backbone(x))


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C), or (N, C, 1, 1) with keepdim, the mean over height and width:
    AdaptiveAvgPool2d(1) (+ Flatten) in value, but its CUDA backward is a plain broadcast, where
    adaptive pooling's uses atomic adds and is not deterministic."""

    def __init__(self, keepdim: bool = False):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=self.keepdim)


def scratch_cnn(cfg: C.ScratchCNN, num_classes: int) -> Classifier:
    """The SmallCNN: [conv3x3(pad 1) -> (BN) -> ReLU -> MaxPool(2)] per channel count, GAP, MLP head."""
    layers: list[nn.Module] = []
    in_channels = 3
    for out_channels in cfg.channels:
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_channels = out_channels
    backbone = nn.Sequential(*layers, GlobalAvgPool())
    head = nn.Sequential(
        nn.Linear(in_channels, cfg.hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes)
    )
    return Classifier(backbone, head)


def receptive_field(cfg: C.ScratchCNN) -> int:
    """Side, in input pixels, of the window that one feature seen by the global pooling depends on.

    Block i (from 0) adds conv3x3's 2 and MaxPool(2)'s 1 input-of-block pixels, each worth 2**i
    image pixels: 1 + 3 * (2**n - 1). Objects larger than this are only seen in parts, which the
    global average then mixes; spec/test_conv.py checks the formula against the built layers.
    """
    return 3 * 2 ** len(cfg.channels) - 2


@dataclass(frozen=True)
class Arch:
    """How imgcls takes one torchvision classifier apart: its constructor, the ImageNet weights that
    "imagenet" means, and the last Linear (a dotted attribute path) that the new head replaces."""

    constructor: Callable[..., nn.Module]
    weights: WeightsEnum
    head: str
    features: int  # the head's input width

    @property
    def head_prefix(self) -> str:
        return self.head + "."


def arch_table() -> dict[str, Arch]:
    """Every torchvision arch the schema names (config.ResNet and config.TorchvisionNet), keyed by arch.

    Built on call: torchvision's import is the slow part, and the schema and the scratch CNN need none of it.
    """
    from torchvision import models as tv

    return {
        "resnet18": Arch(tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1, "fc", 512),
        "resnet34": Arch(tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1, "fc", 512),
        "resnet50": Arch(tv.resnet50, tv.ResNet50_Weights.IMAGENET1K_V2, "fc", 2048),
        "mobilenet_v3_small": Arch(tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "classifier.3", 1024),
        "mobilenet_v3_large": Arch(tv.mobilenet_v3_large, tv.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "classifier.3", 1280),
        "efficientnet_b0": Arch(tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier.1", 1280),
        "convnext_tiny": Arch(tv.convnext_tiny, tv.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "classifier.2", 768),
    }


def torchvision_net(cfg: C.ResNet | C.TorchvisionNet, num_classes: int) -> Classifier:
    """The arch with its weights, every AdaptiveAvgPool2d(1) a GlobalAvgPool, and its last Linear
    replaced by a new head: the backbone is everything before that Linear."""
    arch = arch_table()[cfg.arch]
    # ImageNet weights first: missing ones fail before the (for convnext_tiny, seconds-long) random init.
    imagenet = imagenet_state(cfg.arch, arch.weights) if cfg.weights == "imagenet" else None
    match cfg:
        case C.ResNet():
            backbone = arch.constructor(weights=None, zero_init_residual=cfg.zero_init_residual)
        case C.TorchvisionNet():
            backbone = arch.constructor(weights=None)
        case _:
            assert_never(cfg)
    match cfg.weights:
        case "none":
            pass
        case "imagenet":
            backbone.load_state_dict(imagenet)
        case path:
            _load_backbone_file(backbone, path, cfg.arch, arch.head_prefix)
    parent, _, last = arch.head.rpartition(".")
    setattr(backbone.get_submodule(parent), last, nn.Identity())
    _replace_global_pooling(backbone)
    return Classifier(backbone, nn.Linear(arch.features, num_classes), cfg.freeze_backbone)


def _replace_global_pooling(net: nn.Module) -> None:
    """Each AdaptiveAvgPool2d(1) (before the head; inside MobileNet's and EfficientNet's squeeze-excitation
    blocks) becomes the same-shaped plain mean, whose CUDA backward is deterministic. No weights change."""
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            parent, _, last = name.rpartition(".")
            setattr(net.get_submodule(parent), last, GlobalAvgPool(keepdim=True))


def build_model(cfg: C.Model, num_classes: int) -> Classifier:
    match cfg:
        case C.ScratchCNN():
            return scratch_cnn(cfg, num_classes)
        case C.ResNet() | C.TorchvisionNet():
            return torchvision_net(cfg, num_classes)
        case _:
            assert_never(cfg)


def build(cfg: C.Model, num_classes: int, device: torch.device, channels_last: bool) -> Classifier:
    """The model on its device and in its memory format."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return build_model(cfg, num_classes).to(device=device, memory_format=memory_format)


def untrained(cfg: C.Model) -> C.Model:
    """The same architecture with no weights to load: a checkpoint's weights replace them anyway."""
    return cfg if isinstance(cfg, C.ScratchCNN) else cfg.model_copy(update={"weights": "none"})


# ------------------------------------------------------------------------------------- weights


def weights_identity(cfg: C.Model) -> dict[str, str | None]:
    """What a run's starting weights were, for its manifest: none, torchvision's named ImageNet
    weights (whose file name carries the first hex digits of its SHA-256, which torch.hub checks),
    or a local file and its SHA-256."""
    match cfg:
        case C.ScratchCNN():
            return {"source": "none"}
        case C.ResNet(weights="none") | C.TorchvisionNet(weights="none"):
            return {"source": "none"}
        case C.ResNet(weights="imagenet") | C.TorchvisionNet(weights="imagenet"):
            weights = arch_table()[cfg.arch].weights
            return {"source": "torchvision", "name": str(weights), "url": weights.url}
        case C.ResNet(weights=path) | C.TorchvisionNet(weights=path):
            return {"source": "file", "path": path, "sha256": provenance.file_sha256(path)}
        case _:
            assert_never(cfg)


def imagenet_state(arch: str, weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch` through its own hub cache (hash-checked download)."""
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # urllib, SSL, socket and hash errors all mean "could not be had"
        raise ConfigError(
            "model.weights",
            [
                f'"imagenet" needs torchvision\'s {arch} weights ({weights}), which could not be loaded '
                f"({type(e).__name__}: {e}). Download {weights.url} and place it at {cached} (the torch hub cache; "
                'TORCH_HOME moves it), or set model.weights to a local state-dict path, or to "none" to train from scratch'
            ],
        ) from None


def _load_backbone_file(backbone: nn.Module, path: str, arch: str, head_prefix: str) -> None:
    """A torchvision-style state dict (.pth via weights_only, or .safetensors), or an imgcls checkpoint;
    its classifier's last layer (`head_prefix`), if any, is dropped: the new head replaces it."""
    state = checkpoint.read_weights(path)
    if any(k.startswith("backbone.") for k in state):  # an imgcls checkpoint: keep the backbone, drop its head
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: not a {arch} state dict ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: not a {arch} state dict (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
