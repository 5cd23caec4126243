"""Models: a backbone that maps images to a feature vector, and a head that maps it to logits.

Models return logits (no softmax): CrossEntropyLoss applies log_softmax itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from typing_extensions import assert_never

from imgcls import checkpoint
from imgcls import config as C
from imgcls.errors import CheckpointError, ConfigError

RESNET18_FEATURES = 512


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
    """(N, C, H, W) -> (N, C), the mean over height and width: AdaptiveAvgPool2d(1) + Flatten in
    value, but its CUDA backward is a plain broadcast, where adaptive pooling's uses atomic adds
    and is not deterministic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1))


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


def resnet18(cfg: C.ResNet18, num_classes: int) -> Classifier:
    from torchvision.models import resnet18 as tv_resnet18

    backbone = tv_resnet18(weights=None)
    match cfg.weights:
        case "none":
            pass
        case "imagenet":
            backbone.load_state_dict(imagenet_resnet18_state())
        case path:
            _load_backbone_file(backbone, path)
    backbone.fc = nn.Identity()
    backbone.avgpool = GlobalAvgPool()  # ResNet's forward flattens after it: a no-op on (N, C)
    return Classifier(backbone, nn.Linear(RESNET18_FEATURES, num_classes), cfg.freeze_backbone)


def build_model(cfg: C.Model, num_classes: int) -> Classifier:
    match cfg:
        case C.ScratchCNN():
            return scratch_cnn(cfg, num_classes)
        case C.ResNet18():
            return resnet18(cfg, num_classes)
        case _:
            assert_never(cfg)


def build(cfg: C.Model, num_classes: int, device: torch.device, channels_last: bool) -> Classifier:
    """The model on its device and in its memory format."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return build_model(cfg, num_classes).to(device=device, memory_format=memory_format)


def untrained(cfg: C.Model) -> C.Model:
    """The same architecture with no weights to load: a checkpoint's weights replace them anyway."""
    return cfg.model_copy(update={"weights": "none"}) if isinstance(cfg, C.ResNet18) else cfg


# ------------------------------------------------------------------------------------- weights


def weights_identity(cfg: C.Model) -> dict[str, str | None]:
    """What a run's starting weights were, for its manifest: none, torchvision's named ImageNet
    weights (whose file name carries the first hex digits of its SHA-256, which torch.hub checks),
    or a local file and its SHA-256."""
    match cfg:
        case C.ScratchCNN():
            return {"source": "none"}
        case C.ResNet18(weights="none"):
            return {"source": "none"}
        case C.ResNet18(weights="imagenet"):
            from torchvision.models import ResNet18_Weights

            weights = ResNet18_Weights.IMAGENET1K_V1
            return {"source": "torchvision", "name": str(weights), "url": weights.url}
        case C.ResNet18(weights=path):
            with open(path, "rb") as f:
                return {"source": "file", "path": path, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        case _:
            assert_never(cfg)



def imagenet_resnet18_state() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights through its own hub cache (hash-checked download)."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # urllib, SSL, socket and hash errors all mean "could not be had"
        raise ConfigError(
            "model.weights",
            [
                f'"imagenet" needs torchvision\'s ResNet18 weights, which could not be loaded ({type(e).__name__}: {e}). '
                f"Download {weights.url} and place it at {cached} (the torch hub cache; TORCH_HOME moves it), "
                'or set model.weights to a local state-dict path, or to "none" to train from scratch'
            ],
        ) from None


def _load_backbone_file(backbone: nn.Module, path: str) -> None:
    """A torchvision-style state dict (.pth via weights_only, or .safetensors), or an imgcls checkpoint."""
    state = checkpoint.read_weights(path)
    if any(k.startswith("backbone.") for k in state):  # an imgcls checkpoint: keep the backbone, drop its head
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: not a ResNet18 state dict ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: not a ResNet18 state dict (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
