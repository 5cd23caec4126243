"""Sweeps as plain experiment files: one base experiment, a few keys with lists of values, one file per combination.

`python -m imgcls.sweep BASE.toml --set optimizer.lr=1e-3,3e-4 --set model.batch_norm=true,false [--out FOLDER] [--run]`

A sweep is nothing but files. Each member is a complete experiment in canonical form (config.to_toml),
so `diff` of two members shows exactly the swept keys and `name`, and any member runs alone with
`python -m imgcls.run`. Values are TOML values, read as the experiment file would read them. Every
member is validated before any file is written, and an existing file that differs from what the
sweep would write is refused, never overwritten. `--run` runs the members in order, skipping finished
ones and resuming an interrupted one, then ranks them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

from imgcls import checkpoint, compare, config, run, rundir, runtime
from imgcls.errors import ConfigError, UserError, guarded

# A key path as the schema's messages write it: dotted keys, list items as [i] (augment[0].p).
_SEGMENT = r"[A-Za-z0-9_-]+(?:\[\d+\])*"
KEY = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
# What the schema allows in a name; everything else in a typed value becomes "_" in a member's name.
UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_NAME = 200  # config.Experiment.name's bound
# What --run does with a member: its run finished (metrics.json), was interrupted, or never started.
Plan = Literal["finished", "resume", "start"]


@dataclass(frozen=True)
class Axis:
    """One --set option: a key path and the values it takes, each with the text it was typed as."""

    key: str
    path: tuple[str | int, ...]
    values: tuple[Any, ...]
    texts: tuple[str, ...]

    def choice(self, i: int) -> str:
        return f"{self.key}={self.texts[i]}"


@dataclass(frozen=True)
class Member:
    """One experiment of a sweep: its name and file stem, the --set values it takes, its validated form."""

    name: str
    choices: tuple[str, ...]
    exp: config.Experiment


# ------------------------------------------------------------------------------------ --set options


def split_values(text: str) -> list[str]:
    """The comma-separated pieces of a value list; commas inside quotes, [..] and {..} stay in their piece."""
    pieces, start, depth, quote, i = [], 0, 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1  # an escaped character, perhaps a quote, ends nothing
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    return [p.strip() for p in [*pieces, text[start:]]]


def parse_set(option: str) -> Axis:
    """`KEY=V1,V2,...` as an Axis, or ConfigError naming the option and every problem in it."""
    key, equals, listed = option.partition("=")
    key = key.strip()
    if not equals:
        raise ConfigError(f"--set {option}", ["expected KEY=VALUE[,VALUE...], e.g. optimizer.lr=1e-3,3e-4"])
    if not KEY.fullmatch(key):
        raise ConfigError(f"--set {option}", [f"{key!r} is not a key path: dotted keys, list items as [i] (optimizer.lr, augment[0].p)"])
    if key == "name":
        raise ConfigError(f"--set {option}", ["name is not swept: each member is named after the base's name and its own values"])
    problems, values, texts, seen = [], [], [], {}
    for text in split_values(listed):
        value, problem = _toml_value(key, text)
        if problem:
            problems.append(problem)
        elif _canonical(value) in seen:
            earlier = seen[_canonical(value)]
            problems.append(f"{text} is given twice" if text == earlier else f"{text} is the same value as {earlier}")
        else:
            seen[_canonical(value)] = text
            values.append(value)
            texts.append(text)
    if problems:
        raise ConfigError(f"--set {option}", problems)
    return Axis(key, _path(key), tuple(values), tuple(texts))


def _toml_value(key: str, text: str) -> tuple[Any, str]:
    if not text:
        return None, "an empty value (two commas in a row, or one at an end)"
    try:
        tree = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        tree = {}
    if list(tree) != ["v"]:  # also refuses a piece that smuggles in a second key after a newline
        hint = ""
        if re.fullmatch(r"[A-Za-z_][\w.-]*", text):
            hint = f"; a string needs quotes, and the shell removes them unless the whole option is quoted: --set '{key}=\"{text}\"'"
        return None, f"{text} is not a TOML value{hint}"
    return tree["v"], ""


def _canonical(value: Any) -> str:
    return tomli_w.dumps({"v": value})


def _path(key: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for segment in key.split("."):
        name, _, indices = segment.partition("[")
        parts += [name, *(int(i) for i in re.findall(r"\d+", indices))]
    return tuple(parts)


def _overlaps(axes: list[Axis]) -> list[str]:
    problems = []
    for a, b in itertools.combinations(axes, 2):
        shorter, longer = sorted((a.path, b.path), key=len)
        if longer[: len(shorter)] == shorter:
            problems.append(f"--set {a.key} and --set {b.key} set the same key: give it one --set with every value")
    return problems


# ------------------------------------------------------------------------------------ the members


def member_names(prefix: str, axes: list[Axis]) -> list[str]:
    """One name per combination, in itertools.product order: `<prefix>-<key>_<value>-...`.

    Keys are shortened to the last part of their path that no other axis shares (lr, not optimizer.lr);
    values keep their typed text with every run of characters a name cannot hold turned into "_". Two
    values of one key that would still look alike (`"a b"` and `"a_b"`, or `"Adam"` and `"adam"` on a
    case-blind file system) get a digest of their text. A name longer than the schema allows keeps its
    first characters and a digest of the whole.
    """
    keys = _key_labels(axes)
    values = [_value_labels(axis) for axis in axes]
    names = []
    for combo in itertools.product(*(range(len(axis.values)) for axis in axes)):
        name = prefix + "".join(f"-{keys[a]}_{values[a][i]}" for a, i in enumerate(combo))
        if len(name) > MAX_NAME:
            name = f"{name[: MAX_NAME - 9]}-{_digest(name)[:8]}"
        names.append(name)
    return names


def _key_labels(axes: list[Axis]) -> list[str]:
    parts = [[str(p) for p in axis.path] for axis in axes]
    labels = []
    for mine in parts:
        for n in range(1, len(mine) + 1):
            label = ".".join(mine[-n:])
            if sum(".".join(other[-n:]).lower() == label.lower() for other in parts) == 1:
                break
        labels.append(UNSAFE.sub("_", label))
    return labels


def _value_labels(axis: Axis) -> list[str]:
    labels = [UNSAFE.sub("_", text).strip("_") for text in axis.texts]
    folded = [label.lower() for label in labels]
    return [f"{label}.{_digest(text)[:6]}" if folded.count(label.lower()) > 1 else label for label, text in zip(labels, axis.texts)]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _name_prefix(base: dict[str, Any], source: str) -> str:
    """The base's name; a base without one (a template) lends its file name."""
    name = base.get("name")
    return name if isinstance(name, str) else UNSAFE.sub("_", Path(source).stem).strip("_") or "sweep"


def expand(base: dict[str, Any], source: str, options: list[str]) -> list[Member]:
    """Every combination of the --set options' values set into the base and validated, or one
    ConfigError listing every problem of every option and member, each under the --set (or the base
    file) that caused it."""
    axes, problems = [], []
    for option in options:
        try:
            axes.append(parse_set(option))
        except ConfigError as e:
            problems += [f"{e.source}: {p}" for p in e.problems]
    problems += _overlaps(axes)
    members, found = _members(base, source, axes)
    problems += found + _duplicates(members)
    if problems:
        raise ConfigError(f"sweep of {source}", list(dict.fromkeys(problems)))
    return members


def _members(base: dict[str, Any], source: str, axes: list[Axis]) -> tuple[list[Member], list[str]]:
    names = member_names(_name_prefix(base, source), axes)
    combos = list(itertools.product(*(range(len(axis.values)) for axis in axes)))
    base_problems = _problems(base | {"name": names[0]})
    members, unset = [], []
    # (the axes to blame, or none for the base file; the problem) -> per axis, the values it showed up with
    blamed: dict[tuple[tuple[int, ...], str], dict[int, list[str]]] = {}
    for name, combo in zip(names, combos):
        tree = copy.deepcopy(base) | {"name": name}
        for axis, i in zip(axes, combo):
            try:
                _assign(tree, axis, axis.values[i])
            except ValueError as e:
                unset.append(str(e))
        found = _problems(tree)
        for problem in found:
            who = _culprits(problem, axes, base_problems)
            values = blamed.setdefault((who, problem), {})
            for a in who:
                values.setdefault(a, []).append(axes[a].texts[combo[a]])
        if not found and not unset:
            members.append(Member(name, tuple(axis.choice(i) for axis, i in zip(axes, combo)), config.validate(tree)))
    lines = []
    for (who, problem), values in blamed.items():
        label = " ".join(f"--set {axes[a].key}={','.join(dict.fromkeys(values[a]))}" for a in who)
        lines.append(f"{label or source}: {problem}")
    return members, unset + lines


def _problems(tree: dict[str, Any]) -> list[str]:
    try:
        config.validate(tree)
    except ConfigError as e:
        return e.problems
    return []


def _assign(tree: dict[str, Any], axis: Axis, value: Any) -> None:
    """Set one value at the axis's key path; tables the base lacks are created, list items are not."""
    node: Any = tree
    for depth, part in enumerate(axis.path):
        where = _key_text(axis.path[:depth])
        if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
            raise ValueError(f"--set {axis.key}: {where} has no item [{part}] in the base file")
        if isinstance(part, str) and not isinstance(node, dict):
            raise ValueError(f"--set {axis.key}: {where} is a value, not a table, in the base file; set {where} itself")
        if depth == len(axis.path) - 1:
            node[part] = value
        else:
            if isinstance(part, str) and part not in node:
                node[part] = {}
            node = node[part]


def _key_text(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _culprits(problem: str, axes: list[Axis], base_problems: list[str]) -> tuple[int, ...]:
    """The axes a member's problem is about: those whose key it names; else none (the base file) if the
    base has it too; else those of its table (model.arch = "resnet18" makes model.channels unknown);
    else all of them."""
    named = tuple(a for a, axis in enumerate(axes) if re.search(rf"(?:^|\s){re.escape(axis.key)}(?=[.\[:]|\s=)", problem))
    if named or problem in base_problems or problem.startswith("name:"):  # every member's name starts with the base's
        return named
    key = problem.split(":")[0]
    table = _key_text(_path(key)[:-1]) if KEY.fullmatch(key) else None
    same = tuple(a for a, axis in enumerate(axes) if _key_text(axis.path[:-1]) == table)
    return same or tuple(range(len(axes)))


def _duplicates(members: list[Member]) -> list[str]:
    """Members that differ in name only: two values the schema reads alike (1 and 1.0 for a float key)."""
    first: dict[str, Member] = {}
    problems = []
    for m in members:
        text = config.to_toml(m.exp.model_copy(update={"name": ""}))
        if text in first:
            problems.append(f"{' '.join(first[text].choices)} and {' '.join(m.choices)} give the same experiment: drop one value")
        first.setdefault(text, m)
    return problems


# ------------------------------------------------------------------------------------ the files


def default_folder(base: Path) -> Path:
    """Next to the base file, named after it: experiments/lr.toml sweeps into experiments/lr/."""
    folder = base.parent / base.stem
    return folder if folder != base else base.parent / f"{base.name}-sweep"


def write(folder: Path, members: list[Member]) -> list[Path]:
    """Each member's file in folder; one that exists with other bytes is refused, with every such file
    named, before anything is written. Files that already hold the right bytes are left as they are."""
    files = {folder / f"{m.name}.toml": config.to_toml(m.exp) for m in members}
    differing = []
    for path, text in files.items():
        try:
            if path.exists() and path.read_bytes() != text.encode():
                differing.append(str(path))
        except OSError as e:
            differing.append(f"{path} ({e.strerror})")
    if differing:
        listed = "\n".join(f"  - {p}" for p in differing)
        raise UserError(
            f"{folder}: files of this sweep already exist there with other contents (edited, or written by a sweep "
            f"of another base or other values); nothing was written:\n{listed}\n"
            "Move them away or delete them, or write this sweep elsewhere with --out"
        )
    for path, text in files.items():
        if not path.exists():
            checkpoint.atomic_write(path, text)
    return list(files)


# ------------------------------------------------------------------------------------ running them


def run_all(paths: list[Path], progress: bool) -> tuple[list[Path], list[str]]:
    """Run each member file in order; returns the finished members' run directories and the failures.

    A finished member (metrics.json) is skipped and an interrupted one resumes, so running the sweep
    again after a Ctrl-C or a crash continues it. A member that fails is reported and the others
    still run.
    """
    exps = _load_all(paths)
    plans = _plans(exps)
    failures = []
    for i, (exp, plan) in enumerate(zip(exps, plans), 1):
        head = f"[{i}/{len(exps)}] {exp.name}"
        if plan == "finished":
            print(f"{head}: finished earlier, skipped", file=sys.stderr)
            continue
        print(f"{head}: {'resuming' if plan == 'resume' else 'running'}", file=sys.stderr)
        try:
            run.run(exp, resume=plan == "resume", progress=progress)
        except UserError as e:
            failures.append(f"{exp.name}: {e}")
            print(f"{head}: failed: {e}", file=sys.stderr)
    return [d for d in map(_run_dir, exps) if (d / "metrics.json").exists()], failures


def _run_dir(exp: config.Experiment) -> Path:
    return Path(exp.output.root) / exp.name


def _load_all(paths: list[Path]) -> list[config.Experiment]:
    """Every member with its folders checked, or one report of every problem before the first run starts."""
    exps, problems = [], []
    for path in paths:
        try:
            exps.append(config.load(path, check_paths=True))
        except ConfigError as e:
            problems += [f"{path}: {p}" for p in e.problems]
    if problems:
        raise ConfigError("sweep", problems)
    return exps


def _plans(exps: list[config.Experiment]) -> list[Plan]:
    """What to do with each member. A run directory that holds a run of another
    experiment (the base was edited since) is refused now, not after the members before it ran."""
    plans: list[Plan] = []
    problems = []
    for exp in exps:
        folder = _run_dir(exp)
        started = (folder / "config.toml").exists() or (folder / rundir.LAST).exists()
        plans.append("finished" if (folder / "metrics.json").exists() else "resume" if started else "start")
        if (folder / "config.toml").exists():
            resolved = exp.model_copy(update={"device": runtime.resolve_device(exp.device, exp.train.precision).type})  # as the run recorded it
            try:
                rundir.refuse_changes(config.load(folder / "config.toml"), resolved, f"{folder} holds a run of another experiment", "run")
            except UserError as e:
                problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imgcls.sweep",
        description="Write one experiment file per combination of values; with --run, run them all and rank them.",
    )
    parser.add_argument("base", help="the experiment every member starts from")
    parser.add_argument("--set", dest="sets", action="append", required=True, metavar="KEY=V1,V2",
                        help="a key path and its comma-separated TOML values (strings quoted); repeat for more keys")
    parser.add_argument("--out", metavar="FOLDER", help="where the files go (default: next to BASE, a folder named after it)")
    parser.add_argument("--run", action="store_true", help="run the members in order (finished ones skipped, an interrupted one resumed), then rank them")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def go() -> int:
        base = Path(args.base)
        members = expand(config.read(base), str(base), args.sets)
        paths = write(Path(args.out) if args.out else default_folder(base), members)
        print("\n".join(map(str, paths)))
        if not args.run:
            return 0
        finished, failures = run_all(paths, progress=not args.quiet and sys.stderr.isatty())
        if finished:
            print(compare.ranking_text(compare.ranking([compare.load_run(d) for d in finished])))
        if failures:
            listed = "\n".join(f"  - {f}" for f in failures)
            raise UserError(f"{len(failures)} of {len(paths)} members failed (the finished ones are ranked above):\n{listed}")
        return 0

    return guarded(go, on_interrupt="run the same command again: finished members are skipped and the interrupted one resumes")


if __name__ == "__main__":
    sys.exit(main())
