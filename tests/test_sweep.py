"""imgcls.sweep: one file per combination of --set values, validated before any is written, never
overwriting an edit; `--run` runs the members, continues an interrupted sweep and ranks the runs."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

import pytest
import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st

from imgcls import compare, config, run, sweep
from imgcls.errors import ConfigError, NonFiniteLoss

from .fixtures import TINY, checkpoint_epoch, experiment, make_data

SETS = ["--set", "optimizer.lr=0.05, 0.01", "--set", "model.batch_norm=true,false"]
NAMES = [
    "tiny-lr_0.05-batch_norm_true",
    "tiny-lr_0.05-batch_norm_false",
    "tiny-lr_0.01-batch_norm_true",
    "tiny-lr_0.01-batch_norm_false",
]


@pytest.fixture
def base(tmp_path, monkeypatch) -> Path:
    """The tiny experiment (2 epochs) and its data in the current folder, as tiny.toml."""
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    return experiment(tmp_path, {"train": {"epochs": 2}}, "tiny.toml")


def stamps(paths) -> dict[str, tuple[bytes, int]]:
    return {str(p): (Path(p).read_bytes(), Path(p).stat().st_mtime_ns) for p in paths}


# ------------------------------------------------------------------------------------ the files


def test_members_are_canonical_experiments_that_differ_in_the_swept_keys_only(base, capsys):
    assert sweep.main(["tiny.toml", *SETS]) == 0
    paths = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert paths == [Path("tiny") / f"{n}.toml" for n in NAMES]  # next to the base, named after it
    exps = [config.load(p) for p in paths]
    for p, exp in zip(paths, exps):
        assert p.read_text() == config.to_toml(exp)
        assert exp.name == p.stem
    assert [(e.optimizer.lr, e.model.batch_norm) for e in exps] == [(0.05, True), (0.05, False), (0.01, True), (0.01, False)]
    base_exp = config.load(base)
    for exp in exps:
        assert set(config.changed_keys(base_exp, exp)) <= {"name", "optimizer.lr", "model.batch_norm"}
    # diff of two members: the name and the one key they differ in, nothing else
    diff = difflib.unified_diff(paths[0].read_text().splitlines(), paths[1].read_text().splitlines(), n=0)
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(changed) == sorted([f'-name = "{NAMES[0]}"', f'+name = "{NAMES[1]}"', "-batch_norm = true", "+batch_norm = false"])


def test_a_rerun_rewrites_nothing_and_an_edited_member_is_refused_by_name(base, capsys):
    assert sweep.main(["tiny.toml", *SETS, "--out", "sweep"]) == 0
    paths = sorted(Path("sweep").iterdir())
    before = stamps(paths)
    assert sweep.main(["tiny.toml", *SETS, "--out", "sweep"]) == 0
    assert stamps(paths) == before

    edited = Path("sweep") / f"{NAMES[2]}.toml"
    edited.write_text(edited.read_text().replace("lr = 0.01", "lr = 0.02"))
    gone = Path("sweep") / f"{NAMES[3]}.toml"
    gone.unlink()
    capsys.readouterr()
    assert sweep.main(["tiny.toml", *SETS, "--out", "sweep"]) == 2
    err = capsys.readouterr().err
    assert str(edited) in err and "nothing was written" in err
    assert [n for n in NAMES if n in err] == [NAMES[2]]
    assert "lr = 0.02" in edited.read_text() and not gone.exists()

    # another base under the same names: every file differs, each is named, none is touched
    edited.unlink()
    experiment(Path.cwd(), {"train": {"epochs": 3}}, "tiny.toml")
    kept = stamps(p for p in paths if p.exists())
    assert sweep.main(["tiny.toml", *SETS, "--out", "sweep"]) == 2
    err = capsys.readouterr().err
    assert all(f"{n}.toml" in err for n in NAMES[:2]) and stamps(kept) == kept


def test_every_bad_set_is_reported_at_once_with_its_key_before_anything_is_written(base, capsys):
    sets = [
        "--set", "optimizer.lr=0.01,-1",           # a bad value in one member
        "--set", "model.batch_nrom=true,false",    # an unknown key
        "--set", "optimizer.name=adam",            # a string the shell stripped of its quotes
        "--set", "scheduler.eta_min=0.02",         # above one member's lr
        "--set", "augment[7].p=0.5",               # a list item the base lacks
    ]
    assert sweep.main(["tiny.toml", *sets]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == [
        "  - --set optimizer.name=adam: adam is not a TOML value; a string needs quotes, and the shell removes them "
        """unless the whole option is quoted: --set 'optimizer.name="adam"'""",
        "  - --set augment[7].p: augment has no item [7] in the base file",
        "  - --set model.batch_nrom=true,false: model.batch_nrom: unknown key; did you mean 'batch_norm'?",
        "  - --set optimizer.lr=0.01 --set scheduler.eta_min=0.02: scheduler.eta_min = 0.02 is above optimizer.lr = 0.01: "
        "cosine annealing would raise the learning rate; set eta_min <= lr",
        "  - --set optimizer.lr=-1: optimizer.lr: Input should be greater than 0 (got -1)",
    ], err
    assert not Path("tiny").exists()


def test_a_problem_of_the_base_file_is_reported_under_its_name(base, capsys):
    experiment(Path.cwd(), {"data": {"batch_size": 1}}, "tiny.toml")
    assert sweep.main(["tiny.toml", *SETS]) == 2
    err = capsys.readouterr().err
    assert "1 problem:" in err and "- tiny.toml: data.batch_size:" in err


# ------------------------------------------------------------------------------------ running them


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped_and_ranks_every_member(base, monkeypatch, capsys):
    """Ctrl-C after the third member's first epoch; the same command again runs only what is left."""
    real_fit = run.fit

    def interrupt_third(run_dir, feed, opt, state, progress, until):
        if run_dir.exp.name == NAMES[2]:
            real_fit(run_dir, feed, opt, state, progress, 1)
            raise KeyboardInterrupt
        real_fit(run_dir, feed, opt, state, progress, until)

    monkeypatch.setattr(run, "fit", interrupt_third)
    args = ["tiny.toml", *SETS, "--run", "--quiet"]
    assert sweep.main(args) == 130
    dirs = [Path("runs") / n for n in NAMES]
    assert [(d / "metrics.json").exists() for d in dirs] == [True, True, False, False]
    assert checkpoint_epoch(dirs[2] / "last.safetensors") == 1 and not dirs[3].exists()
    finished = stamps(d / "metrics.json" for d in dirs[:2])

    monkeypatch.setattr(run, "fit", real_fit)
    calls, real_run = [], run.run

    def counted(exp, **kwargs):
        calls.append((exp.name, kwargs["resume"]))
        return real_run(exp, **kwargs)

    monkeypatch.setattr(run, "run", counted)
    capsys.readouterr()
    assert sweep.main(args) == 0
    out, err = capsys.readouterr()
    assert calls == [(NAMES[2], True), (NAMES[3], False)]
    assert stamps(d / "metrics.json" for d in dirs[:2]) == finished
    assert f"[1/4] {NAMES[0]}: finished earlier, skipped" in err and f"[3/4] {NAMES[2]}: resuming" in err
    assert [json.loads((d / "metrics.json").read_text())["epochs_run"] for d in dirs] == [2, 2, 2, 2]
    ranking = compare.ranking([compare.load_run(d) for d in dirs])
    assert sorted(row.run for row in ranking.rows) == sorted(map(str, dirs))
    assert out.endswith(compare.ranking_text(ranking) + "\n")

    # A member folder holding a run of another experiment is refused before anything runs.
    experiment(Path.cwd(), {"train": {"epochs": 1}}, "tiny.toml")
    calls.clear()
    assert sweep.main([*args, "--out", "other"]) == 2
    assert calls == [] and "train.epochs: 2 (run) vs 1 (now)" in capsys.readouterr().err


def test_a_failing_member_is_reported_and_the_others_still_run(base, monkeypatch, capsys):
    calls = []

    def diverging(exp, **kwargs):
        calls.append(exp.name)
        if exp.optimizer.lr == 0.05:
            raise NonFiniteLoss("training loss is nan at epoch 1, step 2")

    monkeypatch.setattr(run, "run", diverging)
    assert sweep.main(["tiny.toml", *SETS, "--run"]) == 2
    err = capsys.readouterr().err
    assert calls == NAMES
    assert "2 of 4 members failed" in err and f"- {NAMES[0]}: training loss is nan" in err and f"- {NAMES[1]}:" in err


# ------------------------------------------------------------------------------------ what users type


def canonical(value) -> str:
    return tomli_w.dumps({"v": value})


scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.sampled_from(list("ab ,'\"[]{}\\#=\t.-_é")) | st.characters(), max_size=10),
)
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
segments = st.from_regex(r"[A-Za-z0-9_-]{1,8}(\[[0-9]{1,2}\])?", fullmatch=True)
keys = st.lists(segments, min_size=1, max_size=3).map(".".join).filter(lambda k: k != "name")


def typed(value, space: str, literal: bool) -> str:
    """A value as a user types it: arrays spaced, strings in '...' where TOML allows it."""
    if isinstance(value, list):
        return "[" + f",{space}".join(typed(v, space, literal) for v in value) + "]"
    if isinstance(value, str) and literal and not any(c == "'" or (ord(c) < 32 and c != "\t") or c == "\x7f" for c in value):
        return f"'{value}'"
    return canonical(value).removeprefix("v = ").rstrip("\n")


@given(key=keys, values=st.lists(toml_values, min_size=1, max_size=4, unique_by=canonical),
       space=st.sampled_from(["", " ", "  ", "\t"]), literal=st.booleans())
@example(key="optimizer.name", values=["adam, w", 'say "hi", then', "[x]", "it's"], space=" ", literal=True)
@example(key="augment[0].scale", values=[[0.5, 1.0], [0.08, 1]], space="", literal=False)
@example(key="data.train_dir", values=["my photos/train", "a\\,b"], space=" ", literal=False)
def test_a_typed_value_list_reads_back_as_its_toml_values(key, values, space, literal):
    texts = [typed(v, space, literal) for v in values]
    axis = sweep.parse_set(f"{space}{key}{space}={space}" + f"{space},{space}".join(texts) + space)
    assert axis.key == key
    assert [canonical(v) for v in axis.values] == [canonical(v) for v in values]
    assert list(axis.texts) == texts


TABLES = {"": config.Experiment, "data": config.DataConfig, "model": config.ScratchCNN, "optimizer": config.SGD,
          "train": config.TrainConfig, "output": config.OutputConfig}


@given(table=st.sampled_from(sorted(TABLES)), leaf=st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True))
@example(table="optimizer", leaf="lrr")
@example(table="", leaf="seeed")
def test_an_unknown_key_is_reported_under_its_set(table, leaf):
    if leaf in TABLES[table].model_fields or (table == "model" and leaf == "arch") or (table == "optimizer" and leaf == "name"):
        return
    key = f"{table}.{leaf}".lstrip(".")
    with pytest.raises(ConfigError) as e:
        sweep.expand(copy.deepcopy(TINY), "tiny.toml", [f"{key}=1, 2"])
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"--set {key}=1,2: {key}: unknown key")


@given(st.lists(st.lists(st.text(max_size=90), min_size=1, max_size=3, unique=True), min_size=1, max_size=3))
@example([["Adam", "adam"], ["a b", "a_b", "a/b"]])
@example([["x" * 90, "x" * 89 + "y"], ["z" * 90], ["w" * 90]])
def test_member_names_are_distinct_names_the_schema_accepts(strings):
    """Any typed strings, even ones differing only in case or in characters a name cannot hold."""
    axes = [sweep.parse_set(f"k{i}=" + ",".join(canonical(s).removeprefix("v = ").rstrip() for s in values))
            for i, values in enumerate(strings)]
    names = sweep.member_names("tiny", axes)
    assert len({n.lower() for n in names}) == len(names)
    for name in names:
        assert config.validate(TINY | {"name": name}).name == name
