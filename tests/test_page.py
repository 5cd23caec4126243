"""imgcls.page: report.html opens in a real browser whole, shows any name as text, and stays small."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from imgcls import page, report
from imgcls.run import main as run_main

from . import browser
from .fixtures import cli, experiment, make_data

SECTIONS = {"experiment", "data", "curves", "confusion", "calibration", "per-class", "gallery", "provenance"}

# Class folder names that would break a page written without escaping: "<!--" hides the rest of
# the page, "<style>" and "<textarea>" swallow it, the quote and "<img" would add an element, the
# override reorders the line, and the rest are what made result files fail before.
HOSTILE_CLASSES = (
    "<!--", "<style>", '"><img src=x onerror=alert(1)>', "<textarea>", "a&amp;b",
    "\u202eevil", "line\nbreak", os.fsdecode(b"caf\xe9"), "$\\undefinedcommand$",
)
HOSTILE_FILE = os.fsdecode(b"<b>\xff&lt;" + "\u202e.png".encode())  # a non-UTF-8 byte, markup, an override


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A one-epoch run at a tiny learning rate (so it gets images wrong) on classes with hostile
    names, one val image of each class renamed to a hostile file name; returns the run folder."""
    base = tmp_path_factory.mktemp("page")
    make_data(base, train=2, val=2, classes=HOSTILE_CLASSES)
    for name in HOSTILE_CLASSES:
        (base / "data" / "val" / name / "0.png").rename(base / "data" / "val" / name / HOSTILE_FILE)
    exp = experiment(base, {"train": {"epochs": 1}, "optimizer": {"lr": 1e-6}, "data": {"batch_size": 2}})
    cwd = os.getcwd()
    os.chdir(base)  # the experiment's relative paths start at base
    try:
        assert run_main([str(exp), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return base / "runs" / "tiny"


def misclassified(run_dir: Path, split: str) -> int:
    rows = csv.DictReader(io.StringIO((run_dir / f"predictions_{split}.csv").read_text(encoding="utf-8")))
    return sum(row["true"] != row["predicted"] for row in rows)


def test_the_page_opens_in_a_browser_with_every_section_image_and_name(hostile_run, tmp_path):
    """No console error (nothing fetched: the browser resolves no host), every <img> decoded, every
    section there, and each class name shown as text the way the terminal shows it."""
    wrong = misclassified(hostile_run, "val")
    assert wrong > 0, "the run must get some images wrong for the gallery to show anything"
    shown = browser.open_page(hostile_run / "report.html", tmp_path / "report.png")
    assert shown.console_errors == []
    assert shown.broken_images == []
    assert shown.section_ids == SECTIONS
    for name in HOSTILE_CLASSES:
        assert report.display_name(name) in shown.text, name
    assert "image not found" not in shown.text  # each thumbnail found its file, the non-UTF-8 name included
    assert report.display_name(HOSTILE_FILE) in shown.text
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")


def test_the_page_holds_no_markup_from_a_name_and_fetches_nothing(hostile_run):
    html = (hostile_run / "report.html").read_text(encoding="utf-8")  # strict: valid UTF-8
    assert html.count("<img") == len(list(hostile_run.glob("*.png"))) + min(misclassified(hostile_run, "val"), page.GALLERY_MAX)
    for raw in ("<!--", "<style>", "<textarea>", "\u202e", "<img src=x", "a&amp;b"):
        assert raw not in html.replace(f"<style>{page.CSS}</style>", ""), raw
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html, re.IGNORECASE)


def test_the_page_is_a_function_of_the_run_folder(hostile_run):
    """`python -m imgcls.page RUN_DIR`, run where the run ran, rewrites the run's page byte for byte."""
    before = (hostile_run / "report.html").read_bytes()
    (hostile_run / "report.html").unlink()
    proc = cli("page", str(hostile_run), cwd=hostile_run.parent.parent)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (hostile_run / "report.html").read_bytes() == before


def test_the_page_command_refuses_a_folder_that_holds_no_run(tmp_path):
    proc = cli("page", str(tmp_path), cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "metrics.json" in err and "Traceback" not in err


def test_a_page_of_1000_classes_is_built_in_a_second_and_stays_small(hostile_run, tmp_path):
    """Tables grow by a row per class, the gallery and lists stop at their caps: 1,000 classes and
    20,000 mistakes give a page of bounded size, built quickly."""
    run_dir = tmp_path / "run"
    shutil.copytree(hostile_run, run_dir)
    classes = [f"class {i:04d}" for i in range(1000)]
    preflight = json.loads((run_dir / "preflight.json").read_text())
    for split in preflight["splits"].values():
        split["per_class"] = dict.fromkeys(classes, 20)
        split["images"] = 20 * len(classes)
    preflight |= {"classes": classes, "leakage": [["a.png", "b.png"]] * 5000}
    (run_dir / "preflight.json").write_text(json.dumps(preflight))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["classes"] = classes
    matrix = [[20 if i == j else 0 for j in range(1000)] for i in range(1000)]
    metrics["val"] |= {"confusion_matrix": matrix, "per_class": dict.fromkeys(classes, metrics["val"]["per_class"][HOSTILE_CLASSES[0]])}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    rows = [["path", "true", "predicted", "p_predicted", "p_true"]]
    rows += [[f"c/{i}.png", classes[i % 1000], classes[(i + 1) % 1000], f"{(i % 97) / 97:.6f}", "0.000001"] for i in range(20_000)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (run_dir / "predictions_val.csv").write_text(buf.getvalue())

    start = time.perf_counter()
    path = page.write_report(run_dir)
    seconds = time.perf_counter() - start
    html = path.read_text(encoding="utf-8")
    assert seconds < 3, seconds
    assert len(html.encode()) < 2 * 2**20
    assert html.count("<figure>") == page.GALLERY_MAX
    assert html.count("<tr><td>a.png</td>") == page.LIST_MAX
    assert all(f"<td>{c}</td>" in html for c in (classes[0], classes[-1]))  # every class has its rows


@pytest.mark.parametrize("recorded", ["counted", "every pair listed"])
def test_near_duplicates_show_their_counts_and_the_closest_pairs(hostile_run, tmp_path, recorded):
    """preflight.json as imgcls writes it (counts, the closest pairs) and as an imgcls before the
    counts wrote it (every pair in a list): the page shows the count and LIST_MAX rows either way."""
    run_dir = tmp_path / "run"
    shutil.copytree(hostile_run, run_dir)
    preflight = json.loads((run_dir / "preflight.json").read_text())
    pairs = [{"train": f"near{i}.png", "other": f"v{i % 7}.png", "bits": 2 + i % 3} for i in range(120)]
    conflicts = [{"a": f"conflict{i}.png", "class_a": "x", "b": f"u{i}.png", "class_b": "y", "bits": 4} for i in range(60)]
    if recorded == "counted":
        preflight |= {"near_duplicates": {"pairs": 9000, "images": 7, "listed": pairs},
                      "label_conflicts": {"pairs": 60, "images": 120, "listed": conflicts}}
        counts = ["within a few bits of a training image (a resized or re-encoded copy): 7 (9000 pairs), the closest",
                  "under two classes: 60 (120 files), the closest"]
    else:
        preflight |= {"near_duplicates": pairs, "label_conflicts": conflicts}
        counts = ["a resized or re-encoded copy): 120 pairs, the closest", "under two classes: 60 pairs, the closest"]
    (run_dir / "preflight.json").write_text(json.dumps(preflight))
    html = page.write_report(run_dir).read_text(encoding="utf-8")
    assert all(c in html for c in counts), counts
    assert html.count("<tr><td>near") == html.count("<tr><td>conflict") == page.LIST_MAX


def test_without_a_browser_the_browser_tests_skip_unless_one_is_required(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv(browser.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        browser.open_page(tmp_path / "x.html", tmp_path / "x.png")
    monkeypatch.setenv(browser.REQUIRE, "1")
    with pytest.raises(BaseException, match="no-chromium") as outcome:  # BaseException: a skip must not pass as one
        browser.open_page(tmp_path / "x.html", tmp_path / "x.png")
    assert outcome.type is pytest.fail.Exception
