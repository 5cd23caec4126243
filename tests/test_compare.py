"""imgcls.compare on tiny real runs: what differed between runs, and the paired tests on their predictions."""

from __future__ import annotations

import csv
import json
import os
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls import compare, config, run, stats

from .fixtures import cli, experiment, image_array, make_data


def train(base: Path, name: str, overrides: dict | None = None) -> Path:
    """Run the tiny experiment (two epochs) under base as `name`; returns its run directory."""
    path = experiment(base, {"name": name, "train": {"epochs": 2}, **(overrides or {})}, f"{name}.toml")
    cwd = os.getcwd()
    os.chdir(base)  # the experiment's relative paths start at base
    try:
        run.run(config.load(path), progress=False)
    finally:
        os.chdir(cwd)
    return base / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """a and b differ in optimizer.lr, c from a in data.num_workers; d ran on data with one val image replaced."""
    base = make_data(tmp_path_factory.mktemp("compare"))
    out = {
        "a": train(base, "a"),
        "b": train(base, "b", {"optimizer": {"lr": 0.003}}),
        "c": train(base, "c", {"data": {"num_workers": 1}}),
    }
    other = make_data(tmp_path_factory.mktemp("replaced"))
    Image.fromarray(image_array(0, 999)).save(other / "data" / "val" / "cat" / "0.png")
    out["d"] = train(other, "d")
    return out


def keys(section: list[dict]) -> list[str]:
    return [k["key"] for k in section]


def test_only_the_learning_rate_is_named_as_changing_results(runs):
    result = compare.compare([compare.load_run(runs["a"]), compare.load_run(runs["b"])])
    assert keys(result["experiment"]["changes_results"]) == ["optimizer.lr"]
    assert result["experiment"]["changes_results"][0]["values"] == [0.05, 0.003]
    assert keys(result["experiment"]["cannot_change_results"]) == ["name"]
    assert result["data"]["changes"] == [{"runs": [0, 1], "changes": []}]
    assert result["environment"]["can_change_bits"] == []


def test_loader_workers_are_named_as_unable_to_change_results(runs):
    result = compare.compare([compare.load_run(runs[k]) for k in "abc"])
    assert keys(result["experiment"]["changes_results"]) == ["optimizer.lr"]
    neutral = {k["key"]: k["values"] for k in result["experiment"]["cannot_change_results"]}
    assert neutral["data.num_workers"] == [0, 0, 1]
    ranked = result["ranking"]
    assert ranked["by"] == "val_loss" and len(ranked["rows"]) == 3
    losses = [r["val_loss"] for r in ranked["rows"]]
    assert losses == sorted(losses)
    for row in ranked["rows"]:
        assert row["low"] <= row["val_acc"] <= row["high"]


def correct_flags(run_dir: Path) -> tuple[list[str], np.ndarray]:
    with open(run_dir / "predictions_val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], np.array([r["true"] == r["predicted"] for r in rows])


def test_paired_statistics_match_an_independent_reference(runs):
    result = compare.compare([compare.load_run(runs["a"]), compare.load_run(runs["b"])])
    (paired,) = [p for p in result["paired"] if p["split"] == "val"]
    paths, a = correct_flags(runs["a"])
    paths_b, b = correct_flags(runs["b"])
    assert paths == paths_b
    only_a = [p for p, x, y in zip(paths, a, b) if x and not y]
    only_b = [p for p, x, y in zip(paths, a, b) if y and not x]
    n, k = len(only_a) + len(only_b), min(len(only_a), len(only_b))
    # Brute force: twice the smaller tail of Binomial(n, 1/2), in exact fractions.
    reference = min(Fraction(1), 2 * sum(Fraction(comb(n, i), 2**n) for i in range(k + 1))) if n else Fraction(1)
    assert (paired["b"], paired["c"]) == (len(only_a), len(only_b))
    assert paired["mcnemar_p"] == pytest.approx(float(reference), rel=1e-12)
    assert paired["flipped"] == {"right_in_a_only": only_a, "right_in_b_only": only_b}
    interval = stats.paired_bootstrap(a, b, seed=0)
    diff = paired["accuracy_difference"]
    assert (diff["low"], diff["high"], diff["estimate"]) == (interval.low, interval.high, interval.estimate)
    assert diff["estimate"] == pytest.approx(b.mean() - a.mean())


def test_a_replaced_val_image_is_named_and_no_paired_test_is_made(runs):
    result = compare.compare([compare.load_run(runs["a"]), compare.load_run(runs["d"])])
    assert result["data"]["changes"][0]["changes"] == ["val: changed cat/0.png"]
    digests = result["data"]["splits"]["val"]["digests"]
    assert digests[0] != digests[1]
    (paired,) = [p for p in result["paired"] if p["split"] == "val"]
    assert "mcnemar_p" not in paired and "images differ" in paired["reason"]
    text = compare.comparison_text(result)
    assert "val: changed cat/0.png" in text and "no paired test" in text


def test_json_parses_and_html_holds_the_sections(runs, tmp_path):
    page = tmp_path / "compare.html"
    proc = cli("compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--json", "--html", str(page), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert keys(result["experiment"]["changes_results"]) == ["optimizer.lr"]
    text = page.read_text()
    for section in ("experiment: changes results", "results", "paired comparison (same images)", "flipped images", "ranked by val_loss"):
        assert f"<h2>{section}</h2>" in text
    assert "<script" not in text and "http" not in text.replace("<!DOCTYPE html>", "")


def test_the_terminal_view_is_aligned_tables(runs):
    text = compare.comparison_text(compare.compare([compare.load_run(runs["a"]), compare.load_run(runs["b"])]))
    assert "== experiment: changes results ==\nkey           a     b\noptimizer.lr  0.05  0.003\n" in text


def test_html_escapes_every_string():
    result = {"runs": ["<b>"], "labels": ["<b>"], "experiment": {"changes_results": [{"key": "<i>", "values": ["<x>"]}], "cannot_change_results": []},
              "environment": {"can_change_bits": [], "cannot_change_bits": []}, "data": {"splits": {}, "changes": []},
              "metrics": [], "paired": []}
    page = compare.comparison_html(result)
    assert "<b>" not in page and "<i>" not in page and "<x>" not in page
    assert "&lt;i&gt;" in page and "&quot;&lt;x&gt;&quot;" in page


def test_folders_that_are_not_finished_runs_are_named(runs, tmp_path, capsys):
    assert compare.main([str(tmp_path / "nowhere"), str(runs["a"])]) == 2
    assert f"{tmp_path / 'nowhere'}: not a run directory" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((runs["a"] / "config.toml").read_text())
    assert compare.main([str(runs["a"]), str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert f"{unfinished}: not a finished run directory: missing manifest.json, metrics.json, predictions_val.csv" in err
    assert "--resume" in err
