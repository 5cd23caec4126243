"""Bad experiment files: every problem reported at once, by key path, before anything is read or written."""

from __future__ import annotations

import os
import re
import time

import pytest
import tomli_w

from imgcls import config, data, run
from imgcls.errors import ConfigError

from .tiny_data import TINY, cli, experiment, make_data


def problems_of(text: str, source: str = "exp.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(text, source)
    return info.value.problems


def toml_with(**sections) -> str:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return tomli_w.dumps(cfg)


def snapshot(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files}


# ----------------------------------------------------------------------------------- case 1


def test_misspelled_key_names_its_path_and_the_nearest_valid_key():
    text = toml_with(data={"batch_sise": 8})
    assert problems_of(text) == ["data.batch_sise: unknown key; did you mean 'batch_size'?"]


def test_missing_required_key_is_named():
    cfg = dict(TINY, data={k: v for k, v in TINY["data"].items() if k != "val_dir"})
    assert problems_of(tomli_w.dumps(cfg)) == ["data.val_dir: required key is missing"]


def test_all_problems_come_in_one_report():
    cfg = dict(TINY, seedd=1, data={k: v for k, v in TINY["data"].items() if k != "train_dir"})
    cfg["optimizer"] = {"name": "sgd", "lr": "0.1", "momentun": 0.9}
    found = problems_of(tomli_w.dumps(cfg))
    assert len(found) == 4, found
    for key in ("seedd", "data.train_dir", "optimizer.lr", "optimizer.momentun"):
        assert any(p.startswith(f"{key}: ") for p in found), (key, found)
    assert any("did you mean 'momentum'" in p for p in found)


# ----------------------------------------------------------------------------------- case 2


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"data": {"batch_size": True}}, "data.batch_size"),
        ({"seed": "42"}, "seed"),
        ({"optimizer": {"name": "sgd", "lr": "1e-3"}}, "optimizer.lr"),
        ({"model": {"arch": "resnet18", "weights": "none", "freeze_backbone": "yes"}}, "model.freeze_backbone"),
        ({"data": {"train_dir": 5}}, "data.train_dir"),
    ],
)
def test_wrong_types_are_refused_per_field(sections, key):
    if "model" in sections:  # a different variant: replace the whole table, not merge into scratch_cnn's
        text = tomli_w.dumps(dict(TINY, **sections))
    else:
        text = toml_with(**sections)
    found = problems_of(text)
    assert len(found) == 1 and found[0].startswith(f"{key}: "), found


def test_integer_learning_rate_and_string_paths_are_fine():
    exp = config.loads(toml_with(optimizer={"name": "sgd", "lr": 1}, data={"train_dir": "some where/train"}))
    assert exp.optimizer.lr == 1.0 and isinstance(exp.optimizer.lr, float)
    assert exp.data.train_dir == "some where/train"


# ----------------------------------------------------------------------------------- case 3


@pytest.mark.parametrize(
    "text, line",
    [
        ('name = "a"\nseed = 1\nseed = 2\n', 3),  # duplicate key
        ('name = "a"\n\n[data\ntrain_dir = "x"\n', 3),  # unclosed table header
        ('name = "a"\n[data]\n\ntrain_dir = "data/tr\nval_dir = "v"\n', 4),  # unterminated string
    ],
    ids=["duplicate-key", "unclosed-table", "unterminated-string"],
)
def test_malformed_toml_gives_file_line_and_column(tmp_path, monkeypatch, capsys, text, line):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    where = re.search(r"line (\d+), column (\d+)", message)
    assert where, message
    assert int(where[1]) == line
    assert 1 <= int(where[2]) <= len(text.splitlines()[line - 1]) + 1
    monkeypatch.chdir(tmp_path)
    assert run.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["broken.toml"]


# ----------------------------------------------------------------------------------- case 4


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"optimizer": {"lr": -0.1}}, "optimizer.lr"),
        ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum"),
        ({"data": {"val_dir": "./data/train/"}}, "data"),
        ({"data": {"val_dir": "data/missing"}}, "data.val_dir"),
        ({"data": {"num_workers": -1}}, "data.num_workers"),
        ({"model": {"channels": [8, 8, 8, 8, 8]}}, "data.image_size"),
    ],
    ids=["lr-zero", "lr-negative", "momentum-one", "same-folder", "missing-folder", "negative-workers", "image-too-small"],
)
def test_impossible_values_stop_the_run_before_any_image_is_read(tmp_path, monkeypatch, capsys, overrides, key):
    make_data(tmp_path)
    exp_path = experiment(tmp_path, overrides)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read before the experiment was checked")

    monkeypatch.setattr(data, "decode", no_reading)
    monkeypatch.setattr(data, "scan_classes", no_reading)
    assert run.main([str(exp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing written: no run directory, no result file


def test_the_same_folder_through_a_link_is_refused(tmp_path, monkeypatch, capsys):
    make_data(tmp_path)
    os.symlink(tmp_path / "data" / "train", tmp_path / "data" / "again")
    exp_path = experiment(tmp_path, {"data": {"val_dir": "data/again"}})
    monkeypatch.chdir(tmp_path)
    assert run.main([str(exp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.val_dir and data.train_dir are the same folder" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_command_line_reports_config_errors_with_exit_code_2_and_no_traceback(tmp_path):
    """Through `python -m imgcls.run`: a schema error and a missing folder (the two stages that check
    an experiment), run side by side to share the start-up cost; the in-process tests cover the rest."""
    make_data(tmp_path)
    cases = {
        "schema": (experiment(tmp_path, {"data": {"batch_sise": 8, "val_dir": None}, "seed": "42"}, "keys.toml"),
                   ["keys.toml: 3 problems", "data.batch_sise", "did you mean 'batch_size'",
                    "data.val_dir: required key is missing", "seed: "]),
        "folder": (experiment(tmp_path, {"data": {"val_dir": "data/nowhere"}}, "folder.toml"),
                   ["data.val_dir", "data/nowhere", "does not exist"]),
    }
    before = snapshot(tmp_path)
    procs = {name: cli("run", str(path), cwd=tmp_path) for name, (path, _) in cases.items()}
    deadline = time.monotonic() + 240
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        for needle in cases[name][1]:
            assert needle in err, (name, needle, err)
    assert snapshot(tmp_path) == before  # nothing written: no run directory, no result file
