"""imgcls.config, the experiment schema: what it accepts, what it refuses and how it says so. Every
problem is reported at once, by key path, before any image is read or anything is written."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import contextlib
import io
import typing

import annotated_types
import pytest
import tomli_w
from hypothesis import assume, example, given
from hypothesis import strategies as st

from imgcls import config, run
from imgcls.errors import ConfigError

from .fixtures import TINY, cli, experiment, make_data

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "x", "data": {"train_dir": "a", "val_dir": "b"}, "model": {"arch": "scratch_cnn"}}


def problems(data: dict) -> list[str]:
    """The problems config.validate finds in an experiment given as a dict."""
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


def problems_of(text: str, source: str = "exp.toml") -> list[str]:
    """The problems config.loads finds in an experiment given as TOML text."""
    with pytest.raises(ConfigError) as info:
        config.loads(text, source)
    return info.value.problems


def toml_with(**sections) -> str:
    """TINY as TOML text, with each section's keys updated (or a top-level key set)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return tomli_w.dumps(cfg)


def snapshot(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files}


# --------------------------------------------------------------------------- shipped experiments


@pytest.mark.parametrize("path", sorted(ROOT.glob("experiments/**/*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_validates_and_round_trips(path):
    exp = config.load(path)
    assert config.loads(config.to_toml(exp)) == exp


def test_shipped_experiments_exist():
    names = {p.stem for p in ROOT.glob("experiments/**/*.toml")}
    assert {"scratch_cnn", "resnet18_frozen", "resnet18_finetune"} <= names


# ----------------------------------------------------------------------------------- case 1


def test_misspelled_key_names_its_path_and_the_nearest_valid_key():
    text = toml_with(data={"batch_sise": 8})
    assert problems_of(text) == ["data.batch_sise: unknown key; did you mean 'batch_size'?"]


def test_unknown_key_in_a_list_of_variants_drops_the_union_tag():
    data = dict(MINIMAL, augment=[{"op": "horizontal_flip", "pp": 0.5}])
    (p,) = problems(data)
    assert p.startswith("augment[0].pp:") and "'p'" in p


def test_unknown_variant_names_the_discriminator():
    (p,) = problems(dict(MINIMAL, scheduler={"name": "exponential"}))
    assert p.startswith("scheduler.name:") and "'cosine'" in p


def test_missing_required_key_is_named():
    cfg = dict(TINY, data={k: v for k, v in TINY["data"].items() if k != "val_dir"})
    assert problems_of(tomli_w.dumps(cfg)) == ["data.val_dir: required key is missing"]


def test_a_missing_section_is_named_beside_a_missing_key():
    found = problems({"name": "x", "data": {"train_dir": "a"}})
    assert {p.split(":")[0] for p in found} == {"data.val_dir", "model"}


def test_all_problems_come_in_one_report():
    cfg = dict(TINY, seedd=1, data={k: v for k, v in TINY["data"].items() if k != "train_dir"})
    cfg["optimizer"] = {"name": "sgd", "lr": "0.1", "momentun": 0.9}
    found = problems_of(tomli_w.dumps(cfg))
    assert len(found) == 4, found
    for key in ("seedd", "data.train_dir", "optimizer.lr", "optimizer.momentun"):
        assert any(p.startswith(f"{key}: ") for p in found), (key, found)
    assert any("did you mean 'momentum'" in p for p in found)


def test_out_of_range_values_and_unknown_keys_come_in_one_report():
    data = dict(MINIMAL, seed=-1, data={"train_dir": "a", "val_dir": "b", "batch_size": 0, "colour": 1})
    found = problems(data)
    assert {p.split(":")[0] for p in found} == {"seed", "data.batch_size", "data.colour"}


# ----------------------------------------------------------------------------------- case 2


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"data": {"batch_size": True}}, "data.batch_size"),
        ({"seed": "42"}, "seed"),
        ({"optimizer": {"name": "sgd", "lr": "1e-3"}}, "optimizer.lr"),
        ({"model": {"arch": "resnet18", "weights": "none", "freeze_backbone": "yes"}}, "model.freeze_backbone"),
        ({"data": {"train_dir": 5}}, "data.train_dir"),
        ({"data": {"image_size": 3.5}}, "data.image_size"),
    ],
)
def test_wrong_types_are_refused_per_field(sections, key):
    if "model" in sections:  # a different variant: replace the whole table, not merge into scratch_cnn's
        # ResNet18 needs 32 px: TINY's 16 would add a second, true problem to the report.
        text = tomli_w.dumps(dict(TINY, **sections) | {"data": TINY["data"] | {"image_size": 32}})
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
    "data, key",
    [
        (with_("data.val_dir", "a"), "data.val_dir"),
        (dict(MINIMAL, optimizer={"name": "sgd", "momentum": 1.0}), "optimizer.momentum"),
        (dict(MINIMAL, optimizer={"name": "sgd", "momentum": 0.0, "nesterov": True}), "optimizer"),
        (dict(MINIMAL, optimizer={"name": "adam", "lr": 0}), "optimizer.lr"),
        (with_("data.num_workers", -1), "data.num_workers"),
        (with_("data.image_size", 4), "data.image_size"),
        (dict(MINIMAL, data={"train_dir": "a", "val_dir": "b", "image_size": 16}, model={"arch": "resnet18"}), "data.image_size"),
        (dict(MINIMAL, early_stopping={"monitor": "val_acc"}), "early_stopping.monitor"),
        (with_("train.class_weights", "balance"), "train.class_weights"),
        (with_("train.class_weights", 3), "train.class_weights"),
        (with_("train.class_weights", {"cat": 0}), "train.class_weights.cat"),
        (with_("train.class_weights", {"cat": True}), "train.class_weights.cat"),
        (with_("data.sampler", "weighted"), "data.sampler"),
        (dict(MINIMAL, scheduler={"name": "cosine", "warmup_start_factor": 0}), "scheduler.warmup_start_factor"),
        (dict(MINIMAL, scheduler={"name": "step", "warmup_epochs": 10}), "scheduler.warmup_epochs"),
    ],
)
def test_impossible_values_are_refused(data, key):
    (p,) = problems(data)
    assert re.match(r"[\w.\[\]]+", p).group() == key


@pytest.mark.parametrize("key", ["warmup_epochs", "warmup_start_factor"])
def test_onecycle_refuses_a_warmup_key_and_says_it_has_its_own(key):
    (p,) = problems(dict(MINIMAL, scheduler={"name": "onecycle", "max_lr": 0.1, key: 1}))
    assert p.startswith("scheduler: onecycle warms up by itself (pct_start") and key in p, p


def test_a_warmup_must_leave_an_epoch_of_the_schedule_proper():
    config.validate(dict(MINIMAL, scheduler={"name": "plateau", "warmup_epochs": 2}, train={"epochs": 3}))
    (p,) = problems(dict(MINIMAL, scheduler={"name": "plateau", "warmup_epochs": 3}, train={"epochs": 3}))
    assert p.startswith("scheduler.warmup_epochs = 3 must be less than train.epochs = 3"), p


def test_class_weights_naming_a_class_not_in_train_are_refused_before_any_image_is_read(tmp_path, monkeypatch, capsys):
    """Each unknown name is reported with the key and the training classes, by the config check and
    by a run, which stops before decoding an image or writing a file. Names are folder names, so
    case counts; a table naming only real classes passes the check."""
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    exp_path = experiment(tmp_path, {"train": {"class_weights": {"cat": 2.0, "Dog": 1.5, "bird": 3.0}}})
    wanted = [f"train.class_weights: {name!r} is not a training class; the classes are ['cat', 'dog']" for name in ("Dog", "bird")]
    assert [p for p in config.path_problems(config.load(exp_path).model_dump(mode="json")) if "class_weights" in p] == wanted
    monkeypatch.setattr("imgcls.data.read", lambda *a, **k: pytest.fail("an image was read"))
    monkeypatch.setattr("imgcls.data.decode", lambda *a, **k: pytest.fail("an image was read"))
    before = snapshot(tmp_path)
    assert run.main([str(exp_path), "--quiet"]) == 2
    assert config.main([str(exp_path)]) == 2
    err = capsys.readouterr().err
    assert all(err.count(line) == 2 for line in wanted) and "'cat' is not" not in err, err
    assert snapshot(tmp_path) == before
    fine = experiment(tmp_path, {"train": {"class_weights": {"dog": 1.5}}}, "fine.toml")
    assert config.path_problems(config.load(fine).model_dump(mode="json")) == []


def test_cross_field_problems_are_listed_one_per_line():
    data = dict(MINIMAL, data={"train_dir": "a", "val_dir": "b", "image_size": 8}, model={"arch": "resnet18"})
    found = problems(dict(data, early_stopping={"monitor": "val_acc"}))
    assert [p.split(" ")[0] for p in found] == ["data.image_size", "early_stopping.monitor"]


# ------------------------------------------------------- memory bounded by the configuration

# Each integer field that sizes memory: (class, field) -> (its key path, an experiment holding value v, its bound).
BOUNDED = {
    ("Experiment", "seed"): ("seed", lambda v: dict(MINIMAL, seed=v), config.MAX_SEED),
    **{
        ("DataConfig", field): (f"data.{field}", lambda v, f=field: dict(MINIMAL, data=MINIMAL["data"] | {f: v}), bound)
        for field, bound in (
            ("image_size", config.MAX_IMAGE_SIZE),
            ("resize_size", config.MAX_RESIZE_SIZE),
            ("batch_size", config.MAX_BATCH_SIZE),
            ("eval_batch_size", config.MAX_BATCH_SIZE),
            ("num_workers", config.MAX_WORKERS),
        )
    },
    **{
        (cls, field): (f"augment[0].{field}", lambda v, op=op, f=field: dict(MINIMAL, augment=[{"op": op, f: v}]), bound)
        for cls, op, field, bound in (
            ("RandomCrop", "random_crop", "padding", config.MAX_IMAGE_SIZE),
            ("Resize", "resize", "size", config.MAX_RESIZE_SIZE),
            ("TrivialAugment", "trivial_augment", "num_magnitude_bins", config.MAX_MAGNITUDE_BINS),
            ("RandAugment", "rand_augment", "num_ops", config.MAX_NUM_OPS),
            ("RandAugment", "rand_augment", "magnitude", 30),
        )
    },
    ("ScratchCNN", "channels"): (
        "model.channels[1]", lambda v: dict(MINIMAL, model={"arch": "scratch_cnn", "channels": [8, v]}), config.MAX_CHANNELS
    ),
    ("ScratchCNN", "hidden"): ("model.hidden", lambda v: dict(MINIMAL, model={"arch": "scratch_cnn", "hidden": v}), config.MAX_HIDDEN),
}
# Counts of epochs cost time, not memory; a blur kernel is bounded by the side it blurs.
UNBOUNDED = {("TrainConfig", "epochs"), ("StepLR", "step_size"), ("PlateauLR", "patience"), ("EarlyStopping", "patience"),
             ("GaussianBlur", "kernel_size"),
             *((cls, "warmup_epochs") for cls in ("NoScheduler", "StepLR", "CosineLR", "PlateauLR"))}


def integer_fields() -> dict[tuple[str, str], int | None]:
    """Every integer field of the schema (lists of integers too) and its upper bound, if any."""
    found, todo, seen = {}, [config.Experiment], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            stack = [field.annotation]
            bounds = [m.le for m in field.metadata if isinstance(m, annotated_types.Le)]
            while stack:
                t = stack.pop()
                if typing.get_origin(t) is typing.Annotated:
                    inner, *meta = typing.get_args(t)
                    bounds += [m.le for fi in meta for m in getattr(fi, "metadata", [fi]) if isinstance(m, annotated_types.Le)]
                    stack.append(inner)
                elif isinstance(t, type) and issubclass(t, config.Section):
                    todo.append(t)
                elif t is int:
                    found[(model.__name__, name)] = min(bounds, default=None)
                else:
                    stack += typing.get_args(t)
    return found


def test_every_integer_that_sizes_memory_has_an_upper_bound_in_the_schema():
    fields = integer_fields()
    assert {k for k, bound in fields.items() if bound is None} == UNBOUNDED
    assert {k: bound for k, bound in fields.items() if bound is not None} == {k: b for k, (_, _, b) in BOUNDED.items()}


@given(field=st.sampled_from(sorted(BOUNDED)), excess=st.integers(1, 2**70))
@example(field=("DataConfig", "resize_size"), excess=1)
@example(field=("Experiment", "seed"), excess=1)  # 2**32: NumPy's seeding raised a traceback in the run
def test_a_size_past_its_bound_is_refused_when_the_file_is_checked_and_the_bound_itself_is_accepted(
    tmp_path_factory, field, excess
):
    """`python -m imgcls.config` refuses an experiment that cannot fit, naming the key, before any image
    or file is touched; the largest accepted value validates."""
    key, tree, bound = BOUNDED[field]
    config.validate(tree(bound))
    path = tmp_path_factory.mktemp("bounds") / "exp.toml"
    path.write_text(tomli_w.dumps(tree(bound + excess)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert config.main([str(path)]) == 2
    assert f"  - {key}: Input should be less than or equal to {bound}" in err.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"optimizer": {"lr": 0}}, "optimizer.lr"),
        ({"optimizer": {"lr": -0.1}}, "optimizer.lr"),
        ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum"),
        ({"data": {"val_dir": "./data/train/"}}, "data.val_dir"),
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

    monkeypatch.setattr("imgcls.data.decode", no_reading)
    monkeypatch.setattr("imgcls.data.scan_classes", no_reading)
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


# ----------------------------------------------------------------------------- ~ means home

# Every path the experiment names, as (key path, experiment holding value v).
PATH_KEYS = {
    "data.train_dir": lambda v: dict(MINIMAL, data={"train_dir": v, "val_dir": "b"}),
    "data.val_dir": lambda v: dict(MINIMAL, data={"train_dir": "a", "val_dir": v}),
    "data.test_dir": lambda v: dict(MINIMAL, data={"train_dir": "a", "val_dir": "b", "test_dir": v}),
    "output.root": lambda v: dict(MINIMAL, output={"root": v}),
    "model.weights": lambda v: dict(MINIMAL, model={"arch": "resnet18", "weights": v}),
}
path_parts = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"]), min_size=1, max_size=10)


@given(key=st.sampled_from(sorted(PATH_KEYS)), parts=st.lists(path_parts, max_size=3), by_name=st.booleans())
@example(key="output.root", parts=[], by_name=False)  # "~": a folder literally named ~ appeared in the working directory
@example(key="data.train_dir", parts=["~", "x"], by_name=True)  # only a leading ~ is home
def test_a_leading_tilde_is_home_and_the_resolved_experiment_records_the_real_path(tmp_path_factory, key, parts, by_name):
    """`~/x` is $HOME/x and `~user/x` that user's home, as in the shell; the resolved experiment (and so
    config.toml, and a resume's comparison) holds the real path, which round-trips."""
    home = str(tmp_path_factory.mktemp("home"))
    me = pwd.getpwuid(os.getuid())
    rest = "".join(f"/{p}" for p in parts)
    value = f"~{me.pw_name}{rest}" if by_name else f"~{rest}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", home)
        exp = config.validate(PATH_KEYS[key](value))
    section, leaf = key.split(".")
    assert tomllib.loads(config.to_toml(exp))[section][leaf] == (me.pw_dir if by_name else home) + rest
    assert config.to_toml(config.loads(config.to_toml(exp))) == config.to_toml(exp)


@given(key=st.sampled_from(sorted(PATH_KEYS)), user=st.from_regex(r"[a-z][a-z0-9_]{11,15}", fullmatch=True))
@example(key="data.train_dir", user="nosuchuser_imgcls")
def test_a_tilde_that_names_no_home_is_refused_naming_the_key(key, user):
    try:
        pwd.getpwnam(user)
        assume(False)  # a real user: their home is fine
    except KeyError:
        pass
    (p,) = problems(PATH_KEYS[key](f"~{user}/images"))
    assert p.startswith(f"{key}: '~{user}' is no home folder"), p


def test_a_run_with_tilde_paths_reads_and_writes_under_home_never_in_a_folder_named_tilde(tmp_path, monkeypatch):
    home = tmp_path / "home"
    make_data(home)
    work = tmp_path / "work"
    work.mkdir()
    exp_path = experiment(work, {"data": {"train_dir": "~/data/train", "val_dir": "~/data/val"}, "train": {"epochs": 1},
                                 "output": {"root": "~/runs"}})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert run.main([str(exp_path), "--quiet"]) == 0
    assert (home / "runs" / "tiny" / "metrics.json").is_file()
    assert not any(p.name == "~" for p in tmp_path.rglob("*"))
    saved = tomllib.loads((home / "runs" / "tiny" / "config.toml").read_text())
    assert saved["data"]["train_dir"] == str(home / "data" / "train") and saved["output"]["root"] == str(home / "runs")


# ---------------------------------------------------------------- an output that cannot be written

folder_names = st.text(st.characters(whitelist_categories=["Ll", "Nd"], max_codepoint=127), min_size=1, max_size=6)


@given(parts=st.lists(folder_names, min_size=1, max_size=3), blocked_at=st.none() | st.integers(0, 3))
@example(parts=["runs"], blocked_at=0)  # output.root is a file
@example(parts=["a", "b"], blocked_at=2)  # the run directory itself is a file
def test_an_output_that_cannot_be_created_is_found_before_any_image_is_read(tmp_path_factory, parts, blocked_at):
    """A file where output.root/<name> needs a folder is reported by the config check (naming
    output.root and the file), and the run stops with it before decoding an image or writing a file."""
    base = tmp_path_factory.mktemp("out")
    make_data(base)
    folders = [base.joinpath(*parts[: i + 1]) for i in range(len(parts))] + [base.joinpath(*parts, "tiny")]
    blocker = folders[blocked_at] if blocked_at is not None and blocked_at < len(folders) else None
    if blocker is not None:
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file, not a folder")
    exp_path = experiment(base, {"data": {"train_dir": str(base / "data" / "train"), "val_dir": str(base / "data" / "val")},
                                 "output": {"root": str(base.joinpath(*parts))}})
    found = [p for p in config.path_problems(config.load(exp_path).model_dump(mode="json")) if p.startswith("output.root")]
    if blocker is None:
        assert found == []
        return
    assert found == [f"output.root: cannot create {str(folders[-1])!r}: {str(blocker)!r} is a file, not a folder"]
    before = snapshot(base)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr("imgcls.data.read", lambda *a, **k: pytest.fail("an image was read"))
        mp.setattr("imgcls.data.decode", lambda *a, **k: pytest.fail("an image was read"))
        assert run.main([str(exp_path), "--quiet"]) == 2
    assert found[0] in err.getvalue()
    assert snapshot(base) == before


def test_an_output_folder_without_write_permission_is_found_before_any_image_is_read(tmp_path, monkeypatch, capsys):
    """As any user but root, a folder without write permission; as root (who may write anywhere but
    on a read-only file system) the same answer from os.access stands in."""
    make_data(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    exp_path = experiment(tmp_path, {"output": {"root": str(locked / "runs")}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("imgcls.data.read", lambda *a, **k: pytest.fail("an image was read"))
    assert run.main([str(exp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"output.root: cannot write in {str(locked)!r} (permission denied or a read-only file system)" in err, err
    assert config.main([str(exp_path)]) == 2
    assert "output.root: cannot write in" in capsys.readouterr().err
    locked.chmod(0o755)


# ------------------------------------------------------------------------ the resolved experiment


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
