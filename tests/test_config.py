"""The experiment schema: what it accepts, what it refuses, and how it says so."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from imgcls import config
from imgcls.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "x", "data": {"train_dir": "a", "val_dir": "b"}, "model": {"arch": "scratch_cnn"}}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.validate(data)
    return info.value.problems


def with_(path: str, value) -> dict:
    """MINIMAL with one dotted key set."""
    data = tomllib.loads(config.to_toml(config.validate(MINIMAL)))
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize("path", sorted(ROOT.glob("experiments/**/*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates_and_round_trips(path):
    exp = config.load(path)
    assert config.loads(config.to_toml(exp)) == exp


def test_shipped_experiments_exist():
    names = {p.stem for p in ROOT.glob("experiments/**/*.toml")}
    assert {"scratch_cnn", "resnet18_frozen", "resnet18_finetune"} <= names


def test_unknown_key_names_its_path_and_the_nearest_valid_key():
    (p,) = problems(with_("data.batch_sise", 3))
    assert p.startswith("data.batch_sise:") and "'batch_size'" in p


def test_unknown_key_in_a_list_of_variants_drops_the_union_tag():
    data = dict(MINIMAL, augment=[{"op": "horizontal_flip", "pp": 0.5}])
    (p,) = problems(data)
    assert p.startswith("augment[0].pp:") and "'p'" in p


@pytest.mark.parametrize(
    "path, value",
    [("data.batch_size", True), ("seed", "42"), ("optimizer.lr", "1e-3"), ("data.image_size", 3.5)],
)
def test_wrong_types_are_refused_per_field(path, value):
    data = with_(path, value)
    if path.startswith("optimizer"):
        data["optimizer"]["name"] = "adam"
    (p,) = problems(data)
    assert p.startswith(f"{path}:")


def test_resnet_freeze_flag_must_be_a_boolean():
    (p,) = problems(dict(MINIMAL, model={"arch": "resnet18", "freeze_backbone": "yes"}))
    assert p.startswith("model.freeze_backbone:")


def test_integer_learning_rate_is_a_number():
    exp = config.validate(dict(MINIMAL, optimizer={"name": "adam", "lr": 1}))
    assert exp.optimizer.lr == 1.0


def test_all_problems_are_reported_at_once():
    data = dict(MINIMAL, seed=-1, data={"train_dir": "a", "val_dir": "b", "batch_size": 0, "colour": 1})
    found = problems(data)
    assert {p.split(":")[0] for p in found} == {"seed", "data.batch_size", "data.colour"}


def test_missing_required_keys_are_named():
    found = problems({"name": "x", "data": {"train_dir": "a"}})
    assert {p.split(":")[0] for p in found} == {"data.val_dir", "model"}


def test_unknown_variant_names_the_discriminator():
    (p,) = problems(dict(MINIMAL, scheduler={"name": "exponential"}))
    assert p.startswith("scheduler.name:") and "'cosine'" in p


@pytest.mark.parametrize(
    "data, key",
    [
        (with_("data.val_dir", "a"), "data"),
        (dict(MINIMAL, optimizer={"name": "sgd", "momentum": 1.0}), "optimizer.momentum"),
        (dict(MINIMAL, optimizer={"name": "sgd", "momentum": 0.0, "nesterov": True}), "optimizer"),
        (dict(MINIMAL, optimizer={"name": "adam", "lr": 0}), "optimizer.lr"),
        (with_("data.num_workers", -1), "data.num_workers"),
        (with_("data.image_size", 4), "data.image_size"),
        (dict(MINIMAL, data={"train_dir": "a", "val_dir": "b", "image_size": 16}, model={"arch": "resnet18"}), "data.image_size"),
        (dict(MINIMAL, early_stopping={"monitor": "val_acc"}), "early_stopping.monitor"),
    ],
)
def test_impossible_values_are_refused(data, key):
    (p,) = problems(data)
    assert re.match(r"[\w.\[\]]+", p).group() == key


def test_cross_field_problems_are_listed_one_per_line():
    data = dict(MINIMAL, data={"train_dir": "a", "val_dir": "b", "image_size": 8}, model={"arch": "resnet18"})
    found = problems(dict(data, early_stopping={"monitor": "val_acc"}))
    assert [p.split(" ")[0] for p in found] == ["data.image_size", "early_stopping.monitor"]


def test_resolved_config_fills_every_default_and_round_trips():
    exp = config.validate(MINIMAL)
    text = config.to_toml(exp)
    assert "resize_size = 256" in text and 'name = "adam"' in text
    assert config.to_toml(config.loads(text)) == text


def test_schema_never_imports_torch():
    code = "import sys, imgcls.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_readme_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    assert start in readme, "README.md lacks the generated reference section"
    section = readme.split(start, 1)[1].split(end, 1)[0]
    assert section == config.reference(), "README reference is stale: run `make reference` and paste it"


def test_malformed_toml_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nname = "y"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)
