"""Model building: shapes, and every way ResNet18 weights can (or cannot) be had offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights, resnet18

from imgcls import config, models
from imgcls.errors import CheckpointError, ConfigError

RESNET_FILE = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]


def resnet_cfg(**kw) -> config.ResNet:
    return config.ResNet(arch="resnet18", **kw)


def reference_state(seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


@pytest.mark.parametrize("size", [8, 13, 32])
def test_scratch_cnn_gives_logits_for_any_accepted_size(size):
    model = models.build_model(config.ScratchCNN(arch="scratch_cnn"), 4).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 4)


def test_imagenet_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = reference_state()
    torch.save(state, tmp_path / "hub" / "checkpoints" / RESNET_FILE)
    model = models.build_model(resnet_cfg(weights="imagenet"), 3)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert model.head.out_features == 3


def test_imagenet_weights_offline_fail_with_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as info:
        models.build_model(resnet_cfg(weights="imagenet"), 3)
    message = str(info.value)
    assert "model.weights" in message
    assert str(tmp_path / "hub" / "checkpoints" / RESNET_FILE) in message
    assert ResNet18_Weights.IMAGENET1K_V1.url in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_state_dict(tmp_path, suffix):
    state = reference_state()
    path = tmp_path / f"w{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = models.build_model(resnet_cfg(weights=str(path)), 2)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_a_wrong_state_dict_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="not a resnet18 state dict"):
        models.build_model(resnet_cfg(weights=str(path)), 2)


def test_frozen_backbone_has_no_trainable_parameters_and_stays_in_eval_mode():
    model = models.build_model(resnet_cfg(weights="none", freeze_backbone=True), 2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert not any(m.training for m in model.backbone.modules())
    assert model.head.training


def test_missing_imagenet_weights_stop_the_run_before_any_file_is_written(tmp_path, shapes_data, monkeypatch):
    from imgcls import decoding, run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    decoded = []
    monkeypatch.setattr(decoding, "read", lambda *a, **k: decoded.append(a) or pytest.fail("an image was decoded"))
    exp = config.validate(
        {
            "name": "r",
            "device": "cpu",
            "data": {"train_dir": str(shapes_data / "train"), "val_dir": str(shapes_data / "val"), "image_size": 32},
            "model": {"arch": "resnet18", "weights": "imagenet", "freeze_backbone": True},
            "output": {"root": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(ConfigError, match="model.weights"):
        run.run(exp, progress=False)
    assert decoded == []
    assert not (tmp_path / "runs").exists()
