"""Claim 18: saving and loading a checkpoint gives identical predictions.

Models are built as a run builds them (`models.build`, with the experiment's memory format), saved with
`RunDir.save` and loaded back with `evaluate.load_for_inference`, the path `evaluate` and `predict` take.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgcls import checkpoint, config, data, evaluate, models, train
from imgcls.rundir import RunDir
from imgcls.errors import CheckpointError

from .strategies import generator, scratch_cnns, seeds
from .support import falsify
from .test_normalization import randomise_batchnorm

CLASSES = ["ant", "bee", "cat"]


def save_in_run_dir(path: Path, exp, model, classes: list[str], state) -> None:
    RunDir(path.parent, exp, classes).save(path.name, model, state)


def check_same_predictions(save, tmp: Path, model_cfg, channels_last: bool, seed: int) -> None:
    exp = config.validate(
        {
            "name": "ckpt",
            "device": "cpu",
            "data": {
                "train_dir": str(tmp / "absent"),
                "val_dir": "v",
                "image_size": max(8, model_cfg.min_image_size + 3),
            },
            "model": model_cfg.model_dump(),
            "train": {"channels_last": channels_last},
        }
    )
    torch.manual_seed(seed)
    model = randomise_batchnorm(models.build(exp.model, len(CLASSES), torch.device("cpu"), exp.train.channels_last), seed).eval()
    images = torch.randint(
        0, 256, (3, 3, exp.data.image_size, exp.data.image_size), dtype=torch.uint8, generator=generator(seed)
    )
    prepare = data.inputs(exp, torch.device("cpu")).prepare
    with torch.no_grad():
        before = model(prepare(images))
    (tmp / "exp.toml").write_text(config.to_toml(exp))
    save(tmp / "best.safetensors", exp, model, CLASSES, train.LoopState(train.Monitor("min"), epoch=1))
    loaded = evaluate.load_for_inference(str(tmp / "exp.toml"), str(tmp / "best.safetensors"))
    assert loaded.classes == CLASSES and not loaded.model.training
    with torch.no_grad():
        after = loaded.model(loaded.inputs.prepare(images))
    assert torch.equal(before, after), (before - after).abs().max()


cases = st.tuples(scratch_cnns(), st.booleans(), seeds)


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
@example(case=(config.ResNet(arch="resnet18", weights="none"), True, 0))  # 45 MB each: one example is enough
def test_saving_and_loading_gives_identical_predictions(tmp_path_factory, case):
    """Saving and loading a checkpoint gives identical predictions: bit-identical logits for the same images,
    for every model variant, BatchNorm statistics included."""
    check_same_predictions(save_in_run_dir, tmp_path_factory.mktemp("ckpt"), *case)


def test_checkpoint_check_catches_lossy_and_incomplete_checkpoints(tmp_path_factory):
    """Broken variants: weights stored as float16, and a checkpoint holding parameters but not BatchNorm buffers."""

    def half_precision(path, exp, model, classes, state):
        save_in_run_dir(path, exp, copy.deepcopy(model).half(), classes, state)

    def parameters_only(path, exp, model, classes, state):
        weights = {k: v.detach() for k, v in model.named_parameters()}
        checkpoint.save(
            path, checkpoint.Checkpoint(weights, {"classes": classes, "experiment": config.to_toml(exp)}, {}, {})
        )

    scratch = st.tuples(scratch_cnns(batch_norm=st.just(True)), st.booleans(), seeds)
    falsify(
        lambda c: check_same_predictions(half_precision, tmp_path_factory.mktemp("c"), *c), scratch, max_examples=10
    )
    falsify(
        lambda c: check_same_predictions(parameters_only, tmp_path_factory.mktemp("c"), *c),
        scratch,
        max_examples=10,
        raises=(CheckpointError,),
    )
