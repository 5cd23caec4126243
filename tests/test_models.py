"""Model building: shapes, and every way a torchvision backbone's weights can (or cannot) be had offline."""

from __future__ import annotations

import typing

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights, resnet18

from imgcls import config, models
from imgcls.errors import CheckpointError, ConfigError

TORCHVISION_ARCHS = [a for cls in (config.ResNet, config.TorchvisionNet) for a in typing.get_args(cls.model_fields["arch"].annotation)]
SMALL_ARCHS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]  # build in well under a second each


def arch_cfg(arch: str, **kw) -> config.ResNet | config.TorchvisionNet:
    return (config.ResNet if arch.startswith("resnet") else config.TorchvisionNet)(arch=arch, **kw)


def arch_state(arch: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A state dict of torchvision's own model of `arch` (1000 classes), as an ImageNet file would hold."""
    torch.manual_seed(seed)
    return models.arch_table()[arch].constructor(weights=None).state_dict()

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


# ----------------------------------------------------------------------------- every torchvision arch


def test_the_arch_table_covers_exactly_the_schemas_arch_names():
    assert sorted(models.arch_table()) == sorted(TORCHVISION_ARCHS)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_every_arch_loads_imagenet_weights_from_the_hub_cache_and_gives_logits(tmp_path, monkeypatch, arch):
    """The file torchvision's weights enum names, in TORCH_HOME/hub/checkpoints: every tensor but the
    replaced last layer's reaches the backbone, no adaptive pooling is left, and small images give
    (N, classes) logits in eval and train mode. One build per arch: resnet50 and convnext_tiny take seconds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    table = models.arch_table()[arch]
    state = arch_state(arch)
    torch.save(state, tmp_path / "hub" / "checkpoints" / table.weights.url.rsplit("/", 1)[1])
    model = models.build_model(arch_cfg(arch, weights="imagenet"), 5)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(table.head_prefix)}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert (model.head.in_features, model.head.out_features) == (table.features, 5)
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 5)
        assert model.train()(torch.rand(2, 3, 48, 48)).shape == (2, 5)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_offline_imagenet_error_names_each_archs_url_and_cache_path(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ConfigError) as info:
        models.build_model(arch_cfg(arch, weights="imagenet"), 3)
    weights = models.arch_table()[arch].weights
    message = str(info.value)
    assert "model.weights" in message and arch in message
    assert weights.url in message
    assert str(tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]) in message


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_a_local_state_dict_of_the_arch_loads_and_one_of_another_arch_is_refused(tmp_path, arch):
    """A backbone's state without the arch's last layer (which the new head replaces anyway) loads whole."""
    path = tmp_path / "w.safetensors"
    head = models.arch_table()[arch].head_prefix
    state = {k: v for k, v in arch_state(arch).items() if not k.startswith(head)}
    save_file(state, str(path))
    model = models.build_model(arch_cfg(arch, weights=str(path)), 2)
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())
    other = next(a for a in SMALL_ARCHS if a != arch)
    with pytest.raises(CheckpointError, match=f"not a {other} state dict"):
        models.build_model(arch_cfg(other, weights=str(path)), 2)


@pytest.mark.parametrize("arch", SMALL_ARCHS)
def test_a_frozen_backbone_keeps_its_bytes_and_batchnorm_statistics_through_training_steps(arch):
    """freeze_backbone: backbone weights and BatchNorm statistics bit-identical after SGD steps in train
    mode; only the head moves."""
    torch.manual_seed(0)
    model = models.build_model(arch_cfg(arch, weights="none", freeze_backbone=True), 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    # The bias: a random-init EfficientNet's eval-mode features are ~1e-15, too small to move the weight.
    assert not torch.equal(after["head.bias"], before["head.bias"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_branchs_last_batchnorm_at_zero(arch):
    """torchvision's zero_init_residual: bn2 of each BasicBlock, bn3 of each Bottleneck; other BatchNorms at one."""
    last = "bn2" if arch == "resnet18" else "bn3"
    for zero in (True, False):
        backbone = models.build_model(arch_cfg(arch, weights="none", zero_init_residual=zero), 2).backbone
        branch_ends = [m.weight for n, m in backbone.named_modules() if n.startswith("layer") and n.endswith(last)]
        assert branch_ends and all(bool((w == 0).all()) == zero for w in branch_ends)
        assert bool((backbone.bn1.weight == 1).all())


def test_zero_init_residual_with_weights_to_load_is_refused():
    with pytest.raises(Exception, match="zero_init_residual"):
        config.ResNet(arch="resnet34", weights="imagenet", zero_init_residual=True)
