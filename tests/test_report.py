"""imgcls.report: every result file is written for any name a file system allows, and the plots stay
bounded in time and pixels whatever the class count."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from imgcls import predict, report

from .fixtures import cli_env

# ------------------------------------------------------------------------------ any name at all

# What a file system may hold as a name: any character but "/" and NUL, and on Linux any bytes,
# which Python hands over with the non-UTF-8 ones as lone surrogates (os.fsdecode).
fs_chars = st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"])
fs_names = st.one_of(
    st.text(fs_chars, min_size=1, max_size=12),
    st.text(fs_chars, min_size=41, max_size=120),  # past a plot label's LABEL_CHARS
    st.text(st.sampled_from("$\\^_{}\n\t\x01\x7f\u202e\u0301e\u00e9 "), min_size=1, max_size=12),  # mathtext, controls
    st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b).map(os.fsdecode),
)

PINNED = [
    ["$x^2$", "$\\undefinedcommand$", "a$b"],  # mathtext: an unknown command raised ValueError inside matplotlib
    [os.fsdecode(b"caf\xe9"), "ok"],  # not UTF-8: the font's set_text raised TypeError, the CSV UnicodeEncodeError
    ["a\x01b", "tab\there", "line\nbreak", "\u202eevil"],
    ["L" * 250, "L" * 249 + "M"],  # long, and alike in their first LABEL_CHARS characters
    ["e\u0301", "\u00e9", "E\u0301"],  # the same letter in two normalisations, and a case away
]


def real_names(base: Path, names: list[str]) -> list[str]:
    """The names as the file system keeps them: each made a folder (holding one file of the same name)
    under base, then listed back. A name the file system refuses is no example."""
    for name in names:
        try:
            (base / name).mkdir()
            (base / name / name).write_bytes(b"")
        except (OSError, ValueError):
            assume(False)
    return sorted(os.listdir(base))


def utf8(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # strict: a text file imgcls writes is valid UTF-8


@given(names=st.lists(fs_names, min_size=1, max_size=4, unique=True))
@example(names=PINNED[0])
@example(names=PINNED[1])
@example(names=PINNED[2])
@example(names=PINNED[3])
@example(names=PINNED[4])
def test_every_result_file_is_written_for_any_class_and_file_name(tmp_path_factory, names):
    """Class folder and file names reach the confusion plot, metrics.json, predictions CSV, history,
    predict's three formats and the terminal; none of them fails, JSON keeps every name exactly, CSV
    and text are valid UTF-8, and each image takes exactly one line of predict's text."""
    base = tmp_path_factory.mktemp("names")
    classes = real_names(base, names)
    files = [os.path.join(c, c) for c in classes]
    out = base / classes[0]  # results go into a folder with a hostile name too
    n = len(classes)
    logits = torch.arange(n * n, dtype=torch.float32).view(n, n).remainder(3)
    labels = torch.arange(n)

    report.plot_confusion(out / "confusion.png", np.ones((n, n), dtype=int).tolist(), classes, "run: val")
    with Image.open(out / "confusion.png") as png:
        png.verify()
    report.write_json(out / "metrics.json", {"classes": classes, "files": files})
    assert json.loads(utf8(out / "metrics.json")) == {"classes": classes, "files": files}
    report.write_history(out / "history.csv", [{"epoch": 1, "train_loss": 0.5, "train_acc": 1.0, "val_loss": 0.5,
                                                "val_acc": 1.0, "lr": 0.1}])
    assert utf8(out / "history.csv").startswith("epoch,")
    report.write_predictions(out / "predictions.csv", files, logits, labels, classes)
    rows = list(csv.reader(io.StringIO(utf8(out / "predictions.csv"))))[1:]
    assert [row[:2] for row in rows] == [[report.text_safe(f), report.text_safe(c)] for f, c in zip(files, classes)]

    results = [{"path": f, "top": [{"class": c, "probability": 0.5}], "tta": "none", "temperature": None} for f, c in zip(files, classes)]
    for fmt in ("json", "csv", "text"):
        buf = io.StringIO()
        predict.write(results, fmt, buf)
        text = buf.getvalue()
        text.encode("utf-8")  # no lone surrogate left: printable on a UTF-8 terminal or file
        if fmt == "json":
            assert json.loads(text) == results
        elif fmt == "csv":
            assert [row[:2] for row in csv.reader(io.StringIO(text))][1:] == [
                [report.text_safe(f), report.text_safe(c)] for f, c in zip(files, classes)
            ]
        else:
            assert len(text.splitlines()) == n and text.count("\n") == n

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        report.print_preflight({"classes": classes, "splits": {}, "bad_images": [], "warnings": []})
    assert len(err.getvalue().splitlines()) == 1


@given(name=fs_names)
@example(name=os.fsdecode(b"\xff\xfe"))
@example(name=os.fsdecode(b"\xed\xa0\x80"))  # a surrogate encoded in UTF-8 is not UTF-8 either
def test_text_safe_writes_a_file_names_stray_bytes_as_escapes_and_keeps_everything_else(name):
    """The bytes of the name that are not UTF-8 become \\xNN; a name that is valid Unicode is unchanged."""
    assert report.text_safe(name) == os.fsencode(name).decode("utf-8", "backslashreplace")


def test_text_safe_escapes_a_surrogate_no_file_system_makes():
    assert report.text_safe("a\ud800b") == "a\\ud800b"


@given(names=st.lists(fs_names, min_size=2, max_size=6, unique=True))
@example(names=PINNED[3])
@example(names=PINNED[4])
def test_plot_labels_are_printable_short_and_tell_classes_apart(names):
    labels = report.plot_labels(names)
    assert all(label.isprintable() and len(label) <= report.LABEL_CHARS for label in labels)
    assert len({unicodedata.normalize("NFC", label) for label in labels}) == len(names)


# ------------------------------------------------------------------------- plots at any scale


@given(
    counts=st.integers(1, 60).flatmap(lambda n: hnp.arrays(np.int64, (n, n), elements=st.integers(0, 10**6))),
    limit=st.integers(1, 30),
)
def test_the_plotted_classes_are_those_of_the_largest_confusions(counts, limit):
    chosen = report.confused_classes(counts, limit)
    assert chosen == sorted(set(chosen)) and len(chosen) == min(limit, len(counts))
    off = counts.copy()
    np.fill_diagonal(off, 0)
    if off.max() > 0 and limit >= 2:
        i, j = np.unravel_index(np.argmax(off), off.shape)
        assert {int(i), int(j)} <= set(chosen)


PLOT_1000 = """
import json, resource, sys, time
import numpy as np
from pathlib import Path
from imgcls import report

# An address-space ceiling: a plot that grew with the class count would fail here, not exhaust the machine.
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
rng = np.random.default_rng(int(sys.argv[2]))
n = 1000
counts = rng.integers(0, 20, (n, n)) * (rng.random((n, n)) < 0.05) + np.diag(rng.integers(0, 100, n))
classes = [f"class {i:04d} " + "x" * int(rng.integers(0, 60)) for i in range(n)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
report.plot_confusion(Path(sys.argv[1]), counts.tolist(), classes, "run: test")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_confusion_matrix_of_1000_classes_plots_in_seconds_into_a_bounded_png(tmp_path):
    """300 classes once took 136 s and 9.5 GB and wrote a PNG Pillow refused; 1000 must plot in
    seconds, in bounded memory, into a PNG of at most MAX_FIGURE_INCHES * DPI pixels a side."""
    path = tmp_path / "confusion.png"
    result = subprocess.run([sys.executable, "-c", PLOT_1000, str(path), "7"], capture_output=True, text=True,
                            env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout)
    assert measured["seconds"] < 30, measured  # ~4 s on the 2-core reference machine
    assert measured["grew_mb"] < 500, measured
    side = report.MAX_FIGURE_INCHES * report.DPI
    with Image.open(path) as png:
        png.load()
        assert png.width <= side and png.height <= side, png.size


# ------------------------------------------------------------------------------ per-epoch output


def test_the_epoch_summary_and_history_show_val_macro_f1():
    """Accuracy hides a class the model never predicts; macro-F1 beside it does not."""
    row = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.7, "val_acc": 0.8, "val_macro_f1": 0.456,
           "lr": 0.01, "weights": "ab"}
    line = report.summary_line(2, 5, row, 1.0, is_best=False)
    assert "val loss 0.7000 acc 0.800 macro-F1 0.456  lr" in line, line
    assert "val_macro_f1" in report.HISTORY_FIELDS
