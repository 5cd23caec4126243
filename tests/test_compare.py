"""imgcls.compare on tiny real runs: what differed between runs, and the paired tests on their predictions."""

from __future__ import annotations

import csv
import json
import shutil
from fractions import Fraction
from html.parser import HTMLParser
from math import comb
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls import compare, page, stats
from imgcls.report import display_name
from imgcls.rundir import FileChange

from . import browser
from .fixtures import CLASSES, cli, experiment, image_array, make_data, run_in

VAL = 12  # val images per class: enough for two runs to disagree on some


def train(base: Path, name: str, overrides: dict | None = None) -> Path:
    """Run the tiny experiment (two epochs) under base as `name`; returns its run directory."""
    overrides = overrides or {}
    path = experiment(base, {"name": name, **overrides, "train": {"epochs": 2, **overrides.get("train", {})}}, f"{name}.toml")
    run_in(base, path)
    return base / "runs" / name


def make_ambiguous_data(base: Path) -> Path:
    """make_data, with half of each val class showing both classes' colour cues: runs that learned
    the cue equally well still answer those differently, so paired runs flip images both ways."""
    make_data(base, val=VAL)
    for label, cls in enumerate(CLASSES):
        for i in range(VAL // 2):
            pixels = image_array(label, 100 + i)
            pixels[..., 0] = pixels[..., 1] = 200
            Image.fromarray(pixels).save(base / "data" / "val" / cls / f"{i}.png")
    return base


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """a and b differ in optimizer.lr, c from a in train.allocator; d ran on data with one val image
    replaced, one val image removed and one training image added."""
    base = make_ambiguous_data(tmp_path_factory.mktemp("compare"))
    out = {
        "a": train(base, "a"),
        "b": train(base, "b", {"optimizer": {"lr": 0.15}}),
        "c": train(base, "c", {"train": {"allocator": "system"}}),
    }
    other = make_ambiguous_data(tmp_path_factory.mktemp("changed"))
    Image.fromarray(image_array(0, 999)).save(other / "data" / "val" / "cat" / "0.png")
    (other / "data" / "val" / "dog" / "11.png").unlink()
    Image.fromarray(image_array(1, 998)).save(other / "data" / "train" / "dog" / "new.png")
    out["d"] = train(other, "d")
    return out


def compared(*dirs: Path) -> compare.Comparison:
    return compare.compare([compare.load_run(d) for d in dirs])


def keys(section: list[compare.Difference]) -> list[str]:
    return [k.key for k in section]


def test_only_the_learning_rate_is_named_as_changing_results(runs):
    result = compared(runs["a"], runs["b"])
    assert keys(result.changes_results) == ["optimizer.lr"]
    assert result.changes_results[0].values == [0.05, 0.15]
    assert keys(result.cannot_change_results) == ["name"]
    assert result.data.changes == [{"train": [], "val": []}]
    assert result.data.weights == [] and result.can_change_bits == [] and result.ranking is None


def correct_flags(run_dir: Path) -> tuple[list[str], np.ndarray]:
    with open(run_dir / "predictions_val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], np.array([r["true"] == r["predicted"] for r in rows])


def bootstrap_reference(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """stats.paired_bootstrap's documented convention, written out: resample r takes draws r*n .. r*n+n-1
    of default_rng(seed).integers(0, n) for both runs; the 2.5% and 97.5% quantiles of the differences."""
    n = a.size
    rng = np.random.default_rng(seed)
    diffs = [(b[idx].sum() - a[idx].sum()) / n for idx in (rng.integers(0, n, size=n) for _ in range(resamples))]
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def test_paired_statistics_match_an_independent_reference(runs):
    result = compared(runs["a"], runs["b"])
    (paired,) = [p for p in result.paired if p.split == "val"]
    paths, a = correct_flags(runs["a"])
    paths_b, b = correct_flags(runs["b"])
    assert paths == paths_b and len(paths) == 2 * VAL == paired.images
    only_a = [p for p, x, y in zip(paths, a, b) if x and not y]
    only_b = [p for p, x, y in zip(paths, a, b) if y and not x]
    n, k = len(only_a) + len(only_b), min(len(only_a), len(only_b))
    assert only_a and only_b  # each run gets images right that the other misses: the pairing matters
    # Twice the smaller tail of Binomial(n, 1/2), in exact fractions.
    reference = min(Fraction(1), 2 * sum(Fraction(comb(n, i), 2**n) for i in range(k + 1)))
    assert paired.mcnemar_p == pytest.approx(float(reference), rel=1e-12)
    assert [f.path for f in paired.right_in_first_only] == only_a
    assert [f.path for f in paired.right_in_second_only] == only_b
    diff = paired.accuracy_difference
    assert (diff.low, diff.high) == pytest.approx(bootstrap_reference(a, b), abs=1e-12)
    assert diff.estimate == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    assert diff.low <= diff.estimate <= diff.high


def test_three_runs_are_ranked_and_a_result_neutral_key_changes_nothing(runs):
    result = compared(runs["a"], runs["b"], runs["c"])
    assert keys(result.changes_results) == ["optimizer.lr"]
    neutral = {k.key: k.values for k in result.cannot_change_results}
    assert neutral["train.allocator"] == ["retain", "retain", "system"]
    a_c = [p for p in result.paired if p.runs == (0, 2)]
    assert all(p.mcnemar_p == 1.0 and p.right_in_first_only == p.right_in_second_only == [] for p in a_c)
    assert result.ranking.by == "val_loss" and not result.ranking.mixed
    losses = {str(runs[k]): json.loads((runs[k] / "metrics.json").read_text())["val"]["loss"] for k in "abc"}
    assert [r.run for r in result.ranking.rows] == sorted(losses, key=lambda r: losses[r])  # stable: a before c
    for row in result.ranking.rows:
        _, correct = correct_flags(Path(row.run))
        wilson = stats.accuracy_interval(int(correct.sum()), correct.size)
        assert (row.low, row.high) == (wilson.low, wilson.high) and row.val_acc == pytest.approx(correct.mean())
    text = compare.ranking_text(result.ranking)
    assert text.splitlines()[0] == "ranked by val_loss" and len(text.splitlines()) == 5


def test_data_changes_are_named_per_split(runs):
    result = compared(runs["a"], runs["d"])
    assert result.data.changes == [{
        "train": [FileChange("dog/new.png", "added", (None, "dog"))],
        "val": [FileChange("dog/11.png", "removed", ("dog", None)), FileChange("cat/0.png", "changed", ("cat", "cat"))],
    }]
    counts = {s.split: s.class_counts for s in result.data.splits}
    assert counts == {"train": [{"cat": 8, "dog": 8}, {"cat": 8, "dog": 9}], "val": [{"cat": VAL, "dog": VAL}, {"cat": VAL, "dog": VAL - 1}]}
    (paired,) = [p for p in result.paired if p.split == "val"]
    assert paired.mcnemar_p is None and "val images differ" in paired.reason
    text = compare.comparison_text(result)
    assert "val: changed cat/0.png\n" in text and "train: added dog/new.png\n" in text and "no paired test" in text


def test_environment_differences_are_split_by_whether_they_can_change_bits(runs, tmp_path):
    moved = shutil.copytree(runs["a"], tmp_path / "moved")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["environment"]["threads"] += 1
    manifest["environment"]["cpu"]["flags"] = ["avx512f"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    timings = json.loads((moved / "timings.json").read_text())
    timings["machine"] |= {"hostname": "elsewhere", "started": "another day"}
    (moved / "timings.json").write_text(json.dumps(timings))
    result = compared(runs["a"], moved)
    assert keys(result.can_change_bits) == ["cpu.flags", "threads"]
    assert result.can_change_bits[0].values[1] == ["avx512f"]
    assert keys(result.cannot_change_bits) == ["hostname"]  # the start time differs between any two runs
    assert keys(result.changes_results) == [] and keys(result.cannot_change_results) == []
    assert result.labels == ["a", "moved"]


class Page(HTMLParser):
    """Tags, section ids, image sources and text of an HTML page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.sections, self.images, self.attributes, self.text = set(), [], [], set(), []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}
        if tag == "section":
            self.sections.append(dict(attrs)["id"])
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "section", "table", "tr", "th", "td",
             "ul", "li", "p", "div", "figure", "figcaption", "img", "br"}


def test_json_parses_and_the_page_holds_every_section_and_thumbnail(runs, tmp_path):
    html_file = tmp_path / "compare.html"
    proc = cli("compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--json", "--html", str(html_file), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert [k["key"] for k in result["experiment"]["changes_results"]] == ["optimizer.lr"]
    assert len(result["ranking"]["rows"]) == 3
    parsed = Page(html_file.read_text(encoding="utf-8"))
    assert parsed.sections == ["runs", "experiment", "data", "environment", "results", "paired", "ranking"]
    assert parsed.tags <= PAGE_TAGS and not any(a.startswith("on") for a in parsed.attributes)
    flips = sum(len(p["right_in_first_only"]) + len(p["right_in_second_only"]) for p in result["paired"] if p["reason"] is None)
    assert flips > 0 and len(parsed.images) == flips  # the runs ran in tmp dirs: every file is found and unchanged
    assert all(src.startswith("data:image/jpeg;base64,") for src in parsed.images)


def test_a_thumbnail_is_left_out_when_its_file_changed_since_the_runs(runs, tmp_path):
    result = compared(runs["a"], runs["b"])
    (paired,) = [p for p in result.paired if p.split == "val"]
    flip = (paired.right_in_first_only + paired.right_in_second_only)[0]
    folder = page.split_folder(paired.root, runs["a"])
    assert compare.thumbnail(folder, flip)[0] is not None
    copy = shutil.copytree(folder, tmp_path / "val")
    Image.fromarray(image_array(0, 555)).save(copy / flip.path)
    assert compare.thumbnail(copy, flip) == (None, "file changed since the runs")


names = st.text(max_size=16) | st.tuples(st.text(max_size=4), st.sampled_from(["\udc80", "\udcff", "\ud800"])).map("".join)


@given(cls=names, path=names, label=names)
@example(cls="<script>alert(1)</script>", path='a&"b\nc.png', label="\u202eevil")
@example(cls="\udc80", path="x\udcffy.png", label="</section>")
@settings(max_examples=30, deadline=None)
def test_every_name_on_the_page_is_escaped(cls, path, label):
    flip = compare.Flip(path, cls, (cls, "other"), None)
    pair = compare.Paired((0, 1), "val", None, None, 2, [flip], [], 0.5, stats.Interval(-1.0, 0.0, -0.5))
    result = compare.Comparison(
        runs=[label, "b"], labels=[label, "b"],
        changes_results=[compare.Difference(label, [cls, None])], cannot_change_results=[],
        data=compare.DataDiff([compare.SplitData("val", ["x", "x"], [{cls: 1}, {cls: 1}])],
                              [{"val": [FileChange(path, "changed", (cls, label))]}], []),
        can_change_bits=[], cannot_change_bits=[],
        results=[compare.MetricRow("val", "f1", cls, [1.0, 0.5], [0.0, -0.5], [None, None])],
        paired=[pair], ranking=None,
    )
    html_text = compare.comparison_html(result)
    html_text.encode("utf-8")  # a lone surrogate would fail here
    parsed = Page(html_text)
    assert parsed.tags <= PAGE_TAGS and parsed.sections == ["runs", "experiment", "data", "environment", "results", "paired"]
    shown = "".join(parsed.text)
    for name in (cls, path, label):
        assert display_name(name) in shown
    # Nothing a person cannot see (a right-to-left override would reorder a line), beyond the markup's line breaks.
    assert all(c.isprintable() for c in html_text.replace("\n", "")), [c for c in html_text if not c.isprintable()]
    assert display_name(path) in compare.comparison_text(result)
    json.dumps(result.to_json())


def test_folders_that_are_not_finished_runs_are_all_named(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((runs["a"] / "config.toml").read_text())
    assert compare.main([str(tmp_path / "nowhere"), str(runs["a"]), str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: not a run directory (no such folder)" in err
    assert f"{unfinished}: not a finished run (no manifest.json, metrics.json, predictions_val.csv)" in err
    assert "complete it with --resume" in err and "Traceback" not in err


def test_damaged_run_files_are_named(runs, tmp_path, capsys):
    emptied, cut = (shutil.copytree(runs["a"], tmp_path / name) for name in ("emptied", "cut"))
    (emptied / "metrics.json").write_text("{}")
    text = (cut / "manifest.json").read_text()
    (cut / "manifest.json").write_text(text[: len(text) // 2])
    assert compare.main([str(emptied), str(cut)]) == 2
    err = capsys.readouterr().err
    assert f"{emptied}: damaged run file: metrics.json has no val.images; metrics.json has no val.loss" in err
    assert f"{cut / 'manifest.json'}: damaged run file: " in err and "Traceback" not in err


@pytest.mark.parametrize("given_runs", [[], ["one"]])
def test_fewer_than_two_runs_is_an_error(given_runs, capsys):
    assert compare.main(given_runs) == 2
    assert f"compare needs at least two run directories, got {len(given_runs)}" in capsys.readouterr().err


def test_the_comparison_page_opens_in_a_browser_with_every_section_and_thumbnail(runs, tmp_path):
    """In headless Chromium: no console error (nothing fetched), every flipped image's thumbnail
    decoded, every section there; a screenshot is kept beside the page."""
    html_file = tmp_path / "compare.html"
    proc = cli("compare", str(runs["a"]), str(runs["b"]), "--html", str(html_file), cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    shown = browser.open_page(html_file, tmp_path / "compare.png")
    assert shown.console_errors == []
    assert shown.broken_images == []
    assert {"runs", "experiment", "data", "environment", "results", "paired"} <= shown.section_ids
    assert "optimizer.lr" in shown.text
    assert html_file.read_text(encoding="utf-8").count("<img") > 0
