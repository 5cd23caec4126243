"""Claim 15: freezing the backbone trains only the head, BatchNorm statistics included.

A real run (`run.run`) of ResNet18 with weights = "none" and freeze_backbone = true on 32x32
generated images; the initial weights are recorded as `models.build_model` returns them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from imgcls import checkpoint, models, run

from .support import tiny_experiment

FROZEN = {"arch": "resnet18", "weights": "none", "freeze_backbone": True}


def record_initial_state(monkeypatch) -> dict[str, torch.Tensor]:
    """The model's state exactly as built, before the run moves or trains it."""
    initial: dict[str, torch.Tensor] = {}
    build = models.build_model

    def recording_build(cfg, num_classes):
        model = build(cfg, num_classes)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(models, "build_model", recording_build)
    return initial


def frozen_run(tiny_data, out: Path, monkeypatch) -> tuple[dict[str, torch.Tensor], Path]:
    initial = record_initial_state(monkeypatch)
    exp = tiny_experiment(tiny_data, out, "frozen", data={"image_size": 32}, model=FROZEN, train={"epochs": 1})
    run.run(exp, progress=False)
    return initial, out / "frozen"


def check_only_head_trained(initial: dict[str, torch.Tensor], run_dir: Path) -> None:
    for name in ("best.safetensors", "last.safetensors"):
        final = checkpoint.load(run_dir / name).model
        assert final.keys() == initial.keys()
        changed = [k for k in final if not torch.equal(final[k], initial[k])]
        backbone = [k for k in changed if k.startswith("backbone.")]
        assert not backbone, f"{name}: backbone tensors changed: {backbone[:6]}"
        assert any(k.startswith("head.") for k in changed), f"{name}: the head did not train"
    assert any(k.endswith("running_mean") for k in initial)  # the BatchNorm buffers were compared too


@pytest.mark.slow
def test_frozen_backbone_is_bit_identical_after_training(tiny_data, tmp_path, no_plots, monkeypatch):
    """Freezing the backbone trains only the head: after a frozen run, every backbone parameter and BatchNorm
    buffer (running mean, variance, batch count) is bit-identical to its initial value."""
    initial, run_dir = frozen_run(tiny_data, tmp_path, monkeypatch)
    check_only_head_trained(initial, run_dir)


@pytest.mark.slow
def test_freezing_check_catches_batchnorm_left_in_train_mode(tiny_data, tmp_path, no_plots, monkeypatch):
    """Broken variant: requires_grad off but the backbone not kept in eval mode, so BatchNorm running
    statistics still move (the parameters alone would look frozen)."""
    monkeypatch.setattr(models.Classifier, "train", nn.Module.train)
    initial, run_dir = frozen_run(tiny_data, tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="running_mean|running_var|num_batches_tracked"):
        check_only_head_trained(initial, run_dir)
