"""Compare finished runs: what differed (experiment, data, environment) and what it did to the results.

`python -m imgcls.compare RUN_A RUN_B [RUN_C ...] [--json] [--html FILE]`

RUN_A is the baseline: every other run is diffed and tested against it. Two runs scored on the same
images (equal split digests) are compared image by image: exact McNemar, a paired bootstrap interval
on the accuracy difference, and the images that flipped. Three or more runs are also ranked.

`compare(runs)` gathers every fact into one `Comparison`; the terminal tables, `--json` and the HTML
page are three renderings of it, so they cannot disagree.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls import config, page, provenance, stats
from imgcls.checkpoint import atomic_write
from imgcls.errors import ConfigError, UserError, guarded
from imgcls.report import display_name, text_safe
from imgcls.report import html_text as _e  # every value a page shows goes through it
from imgcls.rundir import MANIFEST, TIMINGS, FileChange, split_changes

BOOTSTRAP_SEED = 0  # fixed, so a comparison prints the same interval every time
SPLITS = ("val", "test")
# `name` only picks the run's folder (and titles its plots): it differs between any two runs of a root.
NAME_ONLY = {"name"}
# timings.json's machine facts that differ between any two starts by nature, so they tell nothing.
ALWAYS_DIFFERENT = {"started"}
# What the comparison reads of a run's JSON files (metrics of val, and of test where present): a
# hand-edited or foreign file lacking one is named.
MANIFEST_KEYS = ("data.splits", "code", "environment", "weights")
METRIC_KEYS = ("images", "loss", "accuracy", "macro_f1", "per_class")


@dataclass(frozen=True)
class Prediction:
    true: str
    predicted: str

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass(frozen=True)
class Run:
    """One finished run directory, read once."""

    path: Path
    exp: config.Experiment
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    predictions: dict[str, dict[str, Prediction]]  # split -> image path (as the CSV writes it) -> prediction
    machine: dict[str, Any]  # timings.json "machine": facts that cannot change bits


def load_run(path: str | Path) -> Run:
    """Read a finished run directory, or raise naming the folder and every file it lacks."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory ({'a file' if path.exists() else 'no such folder'})")
    splits = [s for s in SPLITS if (path / f"predictions_{s}.csv").exists() or s == "val"]
    needed = ("config.toml", MANIFEST, "metrics.json", *(f"predictions_{s}.csv" for s in splits))
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        started = (path / "config.toml").is_file()
        what = "an unfinished run; complete it with --resume" if started else "not made by imgcls.run"
        raise UserError(f"{path}: not a finished run (no {', '.join(missing)}): {what}")
    try:
        exp = config.load(path / "config.toml")
    except ConfigError as e:
        raise UserError(f"{path}: damaged run file: {e}") from None
    manifest, metrics = _json(path / MANIFEST), _json(path / "metrics.json")
    read = [(MANIFEST, manifest, key) for key in MANIFEST_KEYS]
    read += [("metrics.json", metrics, f"{s}.{key}") for s in SPLITS if s == "val" or s in metrics for key in METRIC_KEYS]
    lacking = [f"{name} has no {key}" for name, tree, key in read if _at(tree, key) is None]
    if lacking:
        raise UserError(f"{path}: damaged run file: {'; '.join(lacking)}")
    predictions = {s: _read_predictions(path / f"predictions_{s}.csv") for s in splits}
    try:  # timings.json holds no result; a copied run may lack it, and then only its machine is unknown
        timings = json.loads((path / TIMINGS).read_text())["machine"]
        machine = {k: v for k, v in timings.items() if k not in ALWAYS_DIFFERENT}
    except (OSError, ValueError, KeyError, AttributeError):
        machine = {}
    return Run(path, exp, manifest, metrics, predictions, machine)


def load_runs(paths: list[str]) -> list[Run]:
    """Every run, or one error naming every folder that is not a finished run."""
    if len(paths) < 2:
        raise UserError(
            f"compare needs at least two run directories, got {len(paths)}: python -m imgcls.compare RUN_A RUN_B [...]"
        )
    runs, problems = [], []
    for p in paths:
        try:
            runs.append(load_run(p))
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    return runs


def _json(path: Path) -> dict[str, Any]:
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: damaged run file: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: damaged run file: not a JSON object")
    return tree


def _read_predictions(path: Path) -> dict[str, Prediction]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            lacking = {"path", "true", "predicted"} - set(reader.fieldnames or [])
            if lacking:
                raise UserError(f"{path}: damaged run file: no column {', '.join(sorted(lacking))}")
            return {row["path"]: Prediction(row["true"], row["predicted"]) for row in reader}
    except (OSError, ValueError, csv.Error) as e:
        raise UserError(f"{path}: damaged run file: {e}") from None


# ------------------------------------------------------------------------------ the comparison


@dataclass(frozen=True)
class Difference:
    """A key whose value is not the same in every run: one value per run, None where absent."""

    key: str
    values: list[Any]


@dataclass(frozen=True)
class SplitData:
    split: str
    digests: list[str | None]  # per run; equal digests mean the very same files and classes
    class_counts: list[dict[str, int]]  # per run


@dataclass(frozen=True)
class DataDiff:
    splits: list[SplitData]
    changes: list[dict[str, list[FileChange]]]  # per run after the first: split -> its files against the baseline's
    weights: list[Difference]  # the starting weights' identity, where it differs


@dataclass(frozen=True)
class MetricRow:
    split: str
    metric: str  # "accuracy", "macro_f1" or "f1" (of `cls`)
    cls: str | None
    values: list[float | None]  # per run; None where that run has no such split or class
    deltas: list[float | None]  # against the first run
    intervals: list[stats.Interval | None]  # Wilson 95% on accuracy; None for the F1 scores


@dataclass(frozen=True)
class Flip:
    """An image one run got right and the other wrong."""

    path: str  # under the split's folder, exactly as the manifest records it
    true: str
    predicted: tuple[str, str]  # by the baseline, by the other run
    sha256: str | None  # the file's content when the runs read it (from the manifest)


@dataclass(frozen=True)
class Paired:
    """The baseline against one run on one split, image by image, where both scored the same images."""

    runs: tuple[int, int]
    split: str
    root: str | None  # the split's folder as the runs recorded it
    reason: str | None = None  # why there is no paired test; the fields below are then empty
    images: int = 0
    right_in_first_only: list[Flip] | None = None  # McNemar's b
    right_in_second_only: list[Flip] | None = None  # McNemar's c
    mcnemar_p: float | None = None
    accuracy_difference: stats.Interval | None = None  # second minus first, percentile bootstrap 95%
    bootstrap_seed: int = BOOTSTRAP_SEED


@dataclass(frozen=True)
class RankRow:
    run: str
    select_best: str
    val_loss: float
    val_acc: float
    low: float  # Wilson 95% interval on val accuracy
    high: float


@dataclass(frozen=True)
class Ranking:
    by: str  # the first run's train.select_best
    mixed: bool  # the runs select their best epoch by different metrics
    rows: list[RankRow]  # best first


@dataclass(frozen=True)
class Comparison:
    runs: list[str]
    labels: list[str]  # short column names: the folder names, or the paths where two folders share a name
    changes_results: list[Difference]
    cannot_change_results: list[Difference]
    data: DataDiff
    can_change_bits: list[Difference]  # code identity and the environment recorded in the manifest
    cannot_change_bits: list[Difference]  # timings.json's machine facts
    results: list[MetricRow]
    paired: list[Paired]
    ranking: Ranking | None  # three or more runs

    def to_json(self) -> dict[str, Any]:
        """The comparison as JSON-ready data, sections as the other views show them."""
        d = asdict(self)
        return {
            "runs": d["runs"], "labels": d["labels"],
            "experiment": {k: d[k] for k in ("changes_results", "cannot_change_results")},
            "data": d["data"],
            "environment": {k: d[k] for k in ("can_change_bits", "cannot_change_bits")},
            "results": d["results"], "paired": d["paired"], "ranking": d["ranking"],
        }


def compare(runs: list[Run]) -> Comparison:
    """Every fact of the comparison; the first run is the baseline."""
    trees = [r.exp.model_dump(mode="json") for r in runs]
    neutral = config.RESULT_NEUTRAL | NAME_ONLY
    keys = differences(trees)
    names = [r.path.name for r in runs]
    bit_facts = [{"code": r.manifest["code"], **r.manifest["environment"]} for r in runs]
    return Comparison(
        runs=[str(r.path) for r in runs],
        labels=names if len(set(names)) == len(names) else [str(r.path) for r in runs],
        changes_results=[k for k in keys if k.key not in neutral],
        cannot_change_results=[k for k in keys if k.key in neutral],
        data=_data(runs),
        can_change_bits=differences(bit_facts),
        cannot_change_bits=differences([r.machine for r in runs]),
        results=_results(runs),
        paired=[paired(runs[0], r, (0, i), s) for i, r in enumerate(runs[1:], 1) for s in SPLITS
                if s in runs[0].metrics or s in r.metrics],
        ranking=ranking(runs) if len(runs) >= 3 else None,
    )


def _at(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def differences(facts: list[dict[str, Any]]) -> list[Difference]:
    """Dotted keys (nested tables walked) whose values are not the same in every one of `facts`."""
    keys = dict.fromkeys(k for f in facts[1:] for k in config.differing_keys(facts[0], f))
    return [Difference(k, [_at(f, k) for f in facts]) for k in keys]


def _data(runs: list[Run]) -> DataDiff:
    splits = []
    for s in dict.fromkeys(s for r in runs for s in r.manifest["data"]["splits"]):
        manifests = [r.manifest["data"]["splits"].get(s, {}) for r in runs]
        counts = [dict(sorted(Counter(f["class"] for f in m.get("files", [])).items())) for m in manifests]
        splits.append(SplitData(s, [m.get("digest") for m in manifests], counts))
    changes = [split_changes(runs[0].manifest, r.manifest) for r in runs[1:]]
    weights = differences([{"weights": r.manifest["weights"]} for r in runs])
    return DataDiff(splits, changes, weights)


def _results(runs: list[Run]) -> list[MetricRow]:
    """Accuracy (with its Wilson interval), macro-F1 and each class's F1, per split, run by run."""
    rows = []
    for s in SPLITS:
        found = [r.metrics.get(s) for r in runs]
        if not any(found):
            continue
        acc = [m["accuracy"] if m else None for m in found]
        rows.append(MetricRow(s, "accuracy", None, acc, _deltas(acc), [_wilson(r, s) for r in runs]))
        macro = [m["macro_f1"] if m else None for m in found]
        rows.append(MetricRow(s, "macro_f1", None, macro, _deltas(macro), [None] * len(runs)))
        for c in dict.fromkeys(c for m in found if m for c in m["per_class"]):
            f1 = [m["per_class"][c]["f1"] if m and c in m["per_class"] else None for m in found]
            rows.append(MetricRow(s, "f1", c, f1, _deltas(f1), [None] * len(runs)))
    return rows


def _deltas(values: list[float | None]) -> list[float | None]:
    return [None if v is None or values[0] is None else v - values[0] for v in values]


def _wilson(run: Run, split: str) -> stats.Interval | None:
    scored = run.predictions.get(split)
    if not scored:
        return None
    return stats.accuracy_interval(sum(p.correct for p in scored.values()), len(scored))


def paired(a: Run, b: Run, runs: tuple[int, int], split: str) -> Paired:
    """McNemar, bootstrap and flipped images, only where both runs scored the very same images."""
    recorded = [r.manifest["data"]["splits"].get(split, {}) for r in (a, b)]
    digests = [m.get("digest") for m in recorded]
    root = recorded[0].get("root")
    if None in digests or split not in a.predictions or split not in b.predictions:
        return Paired(runs, split, root, f"{split} was not evaluated in both runs")
    if digests[0] != digests[1]:
        why = f"{split} images differ (split digests {digests[0][:12]} vs {digests[1][:12]}): no paired test"
        return Paired(runs, split, root, why)
    paths = list(a.predictions[split])
    if set(paths) != set(b.predictions[split]):  # equal digests, so only a hand-edited CSV gets here
        return Paired(runs, split, root, f"{split}: the predictions files list different images: no paired test")
    first = np.array([a.predictions[split][p].correct for p in paths], dtype=bool)
    second = np.array([b.predictions[split][p].correct for p in paths], dtype=bool)
    only_first, only_second = stats.flipped(paths, first, second)
    # The CSV writes a non-UTF-8 byte of a name as \xNN; the manifest holds the name itself.
    files = {text_safe(f["path"]): f for f in recorded[0]["files"]}

    def flip(p: str) -> Flip:
        at_a, at_b, file = a.predictions[split][p], b.predictions[split][p], files.get(p, {})
        return Flip(file.get("path", p), at_a.true, (at_a.predicted, at_b.predicted), file.get("sha256"))

    return Paired(
        runs, split, root, None, len(paths),
        right_in_first_only=[flip(p) for p in only_first],
        right_in_second_only=[flip(p) for p in only_second],
        mcnemar_p=stats.mcnemar_exact(len(only_first), len(only_second)),
        accuracy_difference=stats.paired_bootstrap(first, second, seed=BOOTSTRAP_SEED),
    )


def ranking(runs: list[Run]) -> Ranking:
    """Runs best first by the selection metric (train.select_best) on val, each with a Wilson 95%
    interval on val accuracy; equal runs keep their order. Runs that select by different metrics
    are ranked by the first run's."""
    metric = runs[0].exp.train.select_best
    mixed = len({r.exp.train.select_best for r in runs}) > 1
    rows = []
    for r in runs:
        val = r.metrics["val"]
        wilson = _wilson(r, "val") or stats.accuracy_interval(round(val["accuracy"] * val["images"]), val["images"])
        rows.append(RankRow(str(r.path), r.exp.train.select_best, val["loss"], val["accuracy"], wilson.low,
                            wilson.high))
    rows.sort(key=(lambda row: row.val_loss) if metric == "val_loss" else (lambda row: -row.val_acc))
    return Ranking(metric, mixed, rows)


# ------------------------------------------------------------------------------------ the views
#
# `layout` turns a Comparison into sections of tables, lines and flipped-image galleries, all
# cells plain text; the terminal and the HTML page each render that one layout.

# Flipped images shown per side of a pair (--json lists every one): a glance in the terminal, thumbnails
# and then names on the page.
FLIPS_IN_TERMINAL = 5
THUMBNAILS = 48
FLIPS_ON_PAGE = 500
THUMB_MAX_BYTES = 64 * 2**20  # a larger file is named, not decoded for its thumbnail


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Gallery:
    """The flipped images of one paired comparison: one column per run, each the images only it got right."""

    pair: Paired
    labels: tuple[str, str]  # of the two runs, as the columns name them
    run_dir: str  # the baseline's folder: a relative split root is looked for around it

    def columns(self) -> list[tuple[str, list[Flip]]]:
        """(heading, images) of each side."""
        sides = (self.pair.right_in_first_only, self.pair.right_in_second_only)
        return [(f"right only in {label}", flips or []) for label, flips in zip(self.labels, sides)]


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    parts: list[tuple[str | None, Table | list[str] | Gallery]]  # (subheading, content)


def _fmt(v: float | None) -> str:
    """A metric: four decimals, or four digits when it is tiny."""
    return "-" if v is None else f"{v:.4g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"


def _value(v: Any) -> str:
    """A config or environment value as describe_changes writes it."""
    return "absent" if v is None else display_name(json.dumps(v, ensure_ascii=False), 80)


def _differences(keys: list[Difference], labels: list[str]) -> Table | list[str]:
    return Table(["key", *labels], [[k.key, *map(_value, k.values)] for k in keys]) if keys else ["none"]


def layout(c: Comparison) -> list[Section]:
    labels = [display_name(x) for x in c.labels]
    folders = [["baseline" if i == 0 else str(i), labels[i], display_name(p)] for i, p in enumerate(c.runs)]
    sections = [
        Section("runs", "runs", [(None, Table(["", "run", "folder"], folders))]),
        Section("experiment", "experiment", [
            ("changes results", _differences(c.changes_results, labels)),
            ("cannot change results", _differences(c.cannot_change_results, labels)),
        ]),
        Section("data", "data", _data_parts(c.data, labels)),
        Section("environment", "environment", [
            ("can change bits (code, libraries, CPU, threads)", _differences(c.can_change_bits, labels)),
            ("cannot change bits (machine)", _differences(c.cannot_change_bits, labels)),
        ]),
        Section("results", "results", [
            ("accuracy [Wilson 95% interval], macro-F1, F1 per class; delta: the run minus the baseline",
             _results_table(c.results, labels)),
        ]),
        Section("paired", "paired comparison (same images)", _paired_parts(c, labels)),
    ]
    if c.ranking is not None:
        sections.append(Section("ranking", "ranking", [(ranking_title(c.ranking), _ranking_table(c.ranking))]))
    return sections


def _data_parts(d: DataDiff, labels: list[str]) -> list[tuple[str | None, Table | list[str]]]:
    # One column per split, or per split and run where the runs' images of that split differ.
    columns = []
    for s in d.splits:
        if len(set(s.digests)) == 1:
            columns.append((s.split, s.class_counts[0]))
        else:
            columns += [(f"{s.split} {x}", n) for x, n in zip(labels, s.class_counts)]
    classes = dict.fromkeys(cls for _, n in columns for cls in n)
    counts = [[display_name(cls), *(str(n.get(cls, 0)) for _, n in columns)] for cls in classes]
    same = [[s.split, "yes" if len(set(s.digests)) == 1 else "no", *(x[:12] if x else "-" for x in s.digests)]
            for s in d.splits]
    parts: list[tuple[str | None, Table | list[str]]] = [
        ("same images (split digests)", Table(["split", "same", *labels], same)),
        ("images per class", Table(["class", *(heading for heading, _ in columns)], counts)),
    ]
    for i, changes in enumerate(d.changes, 1):
        lines = [f"{split}: {display_name(str(ch))}" for split, chs in changes.items() for ch in chs]
        parts.append((f"files, {labels[0]} -> {labels[i]}", lines or ["the same files in every split"]))
    if d.weights:
        parts.append(("starting weights", _differences(d.weights, labels)))
    return parts


def _results_table(rows: list[MetricRow], labels: list[str]) -> Table:
    def cell(v: float | None, interval: stats.Interval | None) -> str:
        return _fmt(v) + (f" [{interval.low:.3f}, {interval.high:.3f}]" if interval else "")

    head = ["split", "metric", *labels, *(f"delta {x}" for x in labels[1:])]
    body = [[r.split, f"f1 {display_name(r.cls)}" if r.cls is not None else r.metric, *map(cell, r.values, r.intervals),
             *("-" if d is None else f"{d:+.4f}" for d in r.deltas[1:])] for r in rows]
    return Table(head, body)


def _paired_parts(c: Comparison, labels: list[str]) -> list[tuple[str | None, Table | list[str] | Gallery]]:
    head = ["split", "runs", "images", "right only in first", "right only in second", "McNemar p (exact)",
            "acc second - first [95% paired bootstrap]"]
    rows, galleries = [], []
    for p in c.paired:
        first, second = (labels[i] for i in p.runs)
        pair = f"{first} vs {second}"
        if p.reason is not None:
            rows.append([p.split, pair, "-", "-", "-", "-", p.reason])
            continue
        d = p.accuracy_difference
        rows.append([p.split, pair, str(p.images), str(len(p.right_in_first_only)), str(len(p.right_in_second_only)),
                     f"{p.mcnemar_p:.4g}", f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"])
        if p.right_in_first_only or p.right_in_second_only:
            galleries.append((f"flipped {p.split} images, {pair}", Gallery(p, (first, second), c.runs[p.runs[0]])))
    return [(None, Table(head, rows)), *galleries] if rows else [(None, ["no split to compare"])]


def ranking_title(rank: Ranking) -> str:
    mixed = " (the runs select by different metrics; the first run's is used)" if rank.mixed else ""
    return f"ranked by {rank.by}{mixed}"


def _ranking_table(rank: Ranking) -> Table:
    rows = [[str(i), display_name(r.run), _fmt(r.val_loss), _fmt(r.val_acc), f"[{r.low:.3f}, {r.high:.3f}]"]
            for i, r in enumerate(rank.rows, 1)]
    return Table(["#", "run", "val loss", "val acc", "val acc 95% (Wilson)"], rows)


def ranking_text(rank: Ranking) -> str:
    return f"{ranking_title(rank)}\n{_text_table(_ranking_table(rank))}"


# ---------------------------------------------------------------------------------- terminal


def _text_table(t: Table) -> str:
    """Plain-text columns, each as wide as its widest cell."""
    rows = [t.head, *t.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(t.head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _text_gallery(g: Gallery) -> str:
    lines = []
    for heading, flips in g.columns():
        lines.append(f"{heading} ({len(flips)}):")
        rows = [[display_name(f.path), display_name(f.true), *map(display_name, f.predicted)]
                for f in flips[:FLIPS_IN_TERMINAL]]
        if rows:
            lines += ["  " + line for line in _text_table(Table(["image", "true", *g.labels], rows)).splitlines()]
        if len(flips) > FLIPS_IN_TERMINAL:
            lines.append(f"  ... and {len(flips) - FLIPS_IN_TERMINAL} more (--json and --html list them)")
    return "\n".join(lines)


def comparison_text(c: Comparison) -> str:
    out = []
    for section in layout(c):
        out.append(f"== {section.title} ==")
        for heading, body in section.parts:
            if heading:
                out.append(f"{heading}:")
            if isinstance(body, Table):
                out.append(_text_table(body))
            elif isinstance(body, Gallery):
                out.append(_text_gallery(body))
            else:
                out.extend(body)
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- HTML page

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}"
    "th{background:#f2f2f2}h2{margin-top:1.5em;font-size:1.2em}h3{font-size:1em}"
    ".flips{display:flex;gap:2em;align-items:flex-start}.side{flex:1}.grid{display:flex;flex-wrap:wrap;gap:.5em}"
    "figure{margin:0;width:9em;font-size:.8em;overflow-wrap:anywhere}"
    # A tiny image (an 8x8 digit) is enlarged to the box without blurring; a photo is only shrunk.
    "figure img{display:block;width:96px;height:96px;object-fit:contain;image-rendering:pixelated}"
    ".noimg{width:96px;height:60px;background:#eee;color:#777;text-align:center;padding-top:.5em}"
)
# The browser enforces what the page promises: no script runs, nothing is fetched, images are inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def comparison_html(c: Comparison) -> str:
    """A self-contained page (inline CSS and thumbnails, no script, nothing fetched) of the same sections."""
    parts = []
    for section in layout(c):
        body = "".join((f"<h3>{_e(h)}</h3>" if h else "") + _html_part(part) for h, part in section.parts)
        parts.append(f'<section id="{section.id}"><h2>{_e(section.title)}</h2>{body}</section>')
    title = _e(" vs ".join(display_name(x) for x in c.labels))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}"><title>compare {title}</title>'
        f"<style>{_CSS}</style></head><body><h1>compare {title}</h1>{''.join(parts)}</body></html>\n"
    )


def _html_part(part: Table | list[str] | Gallery) -> str:
    if isinstance(part, Table):
        head = "".join(f"<th>{_e(x)}</th>" for x in part.head)
        rows = "".join("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in r) + "</tr>" for r in part.rows)
        return f"<table><tr>{head}</tr>{rows}</table>"
    if isinstance(part, Gallery):
        return _html_gallery(part)
    return "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in part) + "</ul>"


def _html_gallery(g: Gallery) -> str:
    folder = page.split_folder(g.pair.root, Path(g.run_dir)) if g.pair.root is not None else None
    sides = []
    for heading, flips in g.columns():
        figures = "".join(_figure(folder, f, g.labels) for f in flips[:THUMBNAILS])
        rest = flips[THUMBNAILS:FLIPS_ON_PAGE]
        listed = ("<ul>" + "".join(f"<li>{_e(f.path)}</li>" for f in rest) + "</ul>") if rest else ""
        left = len(flips) - FLIPS_ON_PAGE
        more = f"<p>... and {left} more (--json lists every one)</p>" if left > 0 else ""
        sides.append(f'<div class="side"><h4>{_e(heading)} ({len(flips)})</h4>'
                     f'<div class="grid">{figures}</div>{listed}{more}</div>')
    return f'<div class="flips">{"".join(sides)}</div>'


def _figure(folder: Path | None, f: Flip, labels: tuple[str, str]) -> str:
    thumb, why = thumbnail(folder, f) if folder is not None else (None, "split folder not found")
    name = _e(f.path)
    if thumb:
        picture = f'<img src="data:image/jpeg;base64,{thumb}" alt="{name}">'
    else:
        picture = f'<div class="noimg">{_e(why)}</div>'
    said = ", ".join(f"{n}: {display_name(p)}" for n, p in zip(labels, f.predicted))
    return f"<figure>{picture}<figcaption>{name}<br>true {_e(f.true)}<br>{_e(said)}</figcaption></figure>"


def thumbnail(folder: Path, f: Flip) -> tuple[str | None, str]:
    """(page.thumbnail of a flipped image, or None and why): shown only if the file is still the one
    the runs scored."""
    path = folder / f.path
    try:
        if path.stat().st_size > THUMB_MAX_BYTES:
            return None, "too large to show"
        digest = provenance.file_sha256(path)
    except OSError:
        return None, "file not found"
    if f.sha256 is not None and digest != f.sha256:
        return None, "file changed since the runs"
    thumb = page.thumbnail(path)
    return (thumb, "") if thumb else (None, "cannot decode")


# ---------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imgcls.compare", description="Compare finished runs; the first is the baseline."
    )
    parser.add_argument("runs", nargs="*", help="two or more run directories (<output.root>/<name>)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    args = parser.parse_args(argv)

    def go() -> int:
        result = compare(load_runs(args.runs))
        print(json.dumps(result.to_json(), indent=2) if args.json else comparison_text(result))
        if args.html:
            atomic_write(Path(args.html), comparison_html(result))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
