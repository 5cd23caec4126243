"""The run page: report.html, one self-contained file a person opens to read a finished run.

`python -m imgcls.page RUN_DIR` (re)writes RUN_DIR/report.html from the run's files alone.

Everything is inline (CSS, PNGs and thumbnails as data: URIs), nothing is fetched and no script
runs, so the page opens from a file:// URL, a mail attachment or an archive years later. Every
string from the run goes through `_e`: class and file names can hold any character, so each is
shown as report.display_name shows it (a line break as \n, a right-to-left override as \u202e)
and then HTML-escaped. Sizes stay bounded for 1,000 classes: tables grow by a row per class,
lists and the gallery are capped, and the plots are bounded by report's limits. The page holds
no time or host, so two identical runs write it byte for byte.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import statistics
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from imgcls import provenance, stats
from imgcls.checkpoint import atomic_write
from imgcls.errors import UserError, guarded
from imgcls.report import text_safe
from imgcls.report import html_text as _e  # every value a page shows goes through it

GALLERY_MAX = 48
THUMB_SIDE = 96  # pixels on the shorter side
LIST_MAX = 50  # rows shown of each list of files (unreadable, leaked, near-duplicate, conflicting)
SIZE_SAMPLE = 200  # image headers read per split for pixel sizes: a few milliseconds
SIDE_BY_SIDE_CLASSES = 12  # up to this many classes the val and test matrices share a row
INLINE_PNG_MAX = 4 * 2**20  # bytes; report's plots stay far below, a larger file is linked instead
REQUIRED = ("config.toml", "preflight.json", "manifest.json")
SPLITS = ("train", "val", "test")
EVALUATED = ("val", "test")


def write_report(run_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write run_dir/report.html and return its path. `metrics` is what metrics.json holds (or will:
    the run writes the page before metrics.json, which must stay its last file); read when None."""
    run_dir = Path(run_dir)
    missing = [name for name in REQUIRED + (() if metrics else ("metrics.json",)) if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir}: no {', '.join(missing)}; a report needs the folder of a finished run")
    metrics = metrics or _json(run_dir / "metrics.json")
    preflight, manifest = _json(run_dir / "preflight.json"), _json(run_dir / "manifest.json")
    config_text = _text(run_dir / "config.toml")
    name = tomllib.loads(config_text)["name"]
    sections = [
        ("experiment", "Experiment", _experiment(config_text)),
        ("data", "Data card", _data_card(run_dir, preflight, manifest, metrics)),
        ("curves", "Learning curves", _curves(run_dir)),
        ("confusion", "Confusion matrices", _confusion(run_dir, metrics)),
        ("calibration", "Calibration", _calibration(run_dir, metrics)),
        ("per-class", "Per-class metrics", _per_class(metrics)),
        ("gallery", "Misclassified images", _gallery(run_dir, manifest)),
        ("provenance", "Manifest and environment", _provenance(run_dir, manifest)),
    ]
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{content}</section>' for sid, title, content in sections)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(name)}: imgcls run</title><style>{CSS}</style></head><body>"
        f'<header><div class="kicker">imgcls run</div><h1>{_e(name)}</h1>{_headline(metrics)}<nav>{nav}</nav></header>'
        f"<main>{body}</main></body></html>\n"
    )
    path = run_dir / "report.html"
    atomic_write(path, page)
    return path


# ------------------------------------------------------------------ sections


def _headline(metrics: dict[str, Any]) -> str:
    cards = [
        (f"{split} accuracy", _pct(metrics[split]["accuracy"]), f"macro-F1 {metrics[split]['macro_f1']:.3f}")
        for split in EVALUATED if split in metrics
    ]
    early = ", stopped early" if metrics["stopped_early"] else ""
    cards.append(("best epoch", str(metrics["best_epoch"]), f"of {metrics['epochs_run']} by {metrics['select_best']}{early}"))
    cards.append(("classes", str(len(metrics["classes"])), ""))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{_e(v)}</div><div class="sub">{_e(s)}</div></div>'
        for k, v, s in cards
    ) + "</div>"


def _experiment(config_text: str) -> str:
    return ("<p>The resolved experiment, <code>config.toml</code>: every default filled in; "
            f"itself a valid experiment file.</p><pre>{_pre(config_text)}</pre>")


def _data_card(run_dir: Path, preflight: dict, manifest: dict, metrics: dict[str, Any]) -> str:
    splits = {s: preflight["splits"][s] for s in SPLITS if s in preflight["splits"]}
    rows = [[c, *(splits[s]["per_class"][c] for s in splits)] for c in preflight["classes"]]
    rows.append(["all", *(splits[s]["images"] for s in splits)])
    parts = [_warnings(preflight["warnings"]), "<h3>Images per class</h3>",
             _scroll(_table(["class", *splits], rows, total_row=True))]
    parts.append("<h3>What the numbers can say</h3>" + _baselines(splits, metrics))
    parts.append("<h3>Image sizes</h3>" + _sizes(run_dir, manifest))
    parts.append("<h3>Files left out</h3>" + _left_out(splits, preflight["bad_images"]))
    parts.append("<h3>Copies across splits and labels</h3>" + _copies(preflight))
    return "".join(parts)


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return '<div class="warnbox"><b>The preflight warned:</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"


def _baselines(splits: dict[str, dict], metrics: dict[str, Any]) -> str:
    """Accuracy against always answering train's largest class, and the 95% Wilson interval at the
    observed accuracy for the split's size: a difference between runs well inside it is not evidence."""
    train = splits["train"]["per_class"]
    majority = max(train, key=lambda c: train[c])  # the first of the largest, in class order
    rows = []
    for split in EVALUATED:
        if split not in metrics:
            continue
        matrix = metrics[split]["confusion_matrix"]
        n, correct = sum(map(sum, matrix)), sum(row[i] for i, row in enumerate(matrix))
        interval = stats.accuracy_interval(correct, n)
        rows.append([split, n, _pct(correct / n), _pct(splits[split]["per_class"][majority] / n),
                     Num(f"{_pct(interval.low)} to {_pct(interval.high)}"), Num(f"{100 * interval.width:.1f} points")])
    note = (f"<p>The majority baseline always answers <b>{_e(majority)}</b>, the largest training class. The interval "
            "is the 95% Wilson score interval of the accuracy on that many images: two runs whose accuracies differ by "
            "much less than its width may not differ at all.</p>")
    return note + _table(["split", "images", "accuracy", "majority baseline", "95% interval", "width"], rows)


def _sizes(run_dir: Path, manifest: dict) -> str:
    rows = []
    for split, info in manifest["data"]["splits"].items():
        files = info["files"]
        folder = split_folder(info["root"], run_dir)
        step = max(1, len(files) // SIZE_SAMPLE)
        dims = [d for f in files[::step][:SIZE_SAMPLE] if (d := _dimensions(folder, f["path"])) is not None]
        sampled = Num(f"{len(dims)} of {len(files)}" if len(dims) < len(files) else "all")
        nbytes = [f["size"] for f in files]
        rows.append([split, len(files), Num(_bytes(statistics.median(nbytes))), Num(_bytes(sum(nbytes))),
                     _spread([w for w, _ in dims]), _spread([h for _, h in dims]), sampled])
    return ("<p>Pixel sizes as min / median / max, read from the image files' headers (a sample of each split).</p>"
            + _table(["split", "files", "median file", "total", "width px", "height px", "sizes read"], rows))


def _left_out(splits: dict[str, dict], bad_images: list[str]) -> str:
    rows = [[split, reason, count] for split, info in splits.items() for reason, count in sorted(info["skipped_files"].items())]
    skipped = _table(["split", "skipped as not an image", "files"], rows) if rows else '<p class="ok">No file skipped.</p>'
    if not bad_images:
        return skipped + '<p class="ok">No unreadable image.</p>'
    return skipped + f'<p class="warn">{len(bad_images)} unreadable image{_s(bad_images)} left out:</p>' + _list(bad_images)


def _copies(preflight: dict) -> str:
    leakage = preflight["leakage"]
    near, conflicts = (_pairs(preflight[key]) for key in ("near_duplicates", "label_conflicts"))
    return "".join([
        _finding("file in val/test is byte-identical to", "Files in val/test byte-identical to", "a training file",
                 ["train", "val/test"], [list(p) for p in leakage], f"{len(leakage)}"),
        _finding("image in val/test is within a few bits of", "Images in val/test within a few bits of",
                 "a training image (a resized or re-encoded copy)",
                 ["train", "val/test", "bits apart"], [[p["train"], p["other"], p["bits"]] for p in near["listed"]],
                 _count(near, f"{near['images']} ({near['pairs']} pairs)"), "closest"),
        _finding("photo is", "Pairs of files that look like one photo", "under two classes",
                 ["file", "class", "file", "class", "bits apart"],
                 [[p["a"], p["class_a"], p["b"], p["class_b"], p["bits"]] for p in conflicts["listed"]],
                 _count(conflicts, f"{conflicts['pairs']} ({conflicts['images']} files)"), "closest"),
    ])


def _pairs(finding: dict | list) -> dict:
    """A finding as this imgcls records it; a run of an imgcls before the counts kept every pair as a list."""
    return finding if isinstance(finding, dict) else {"pairs": len(finding), "images": None, "listed": finding}


def _count(finding: dict, counted: str) -> str:
    return counted if finding["images"] is not None else f"{finding['pairs']} pairs"


def _finding(none: str, some: str, what: str, head: list[str], rows: list[list], count: str, which: str = "first") -> str:
    """'No <none> <what>.', or '<some> <what>: <count>' above a table of the LIST_MAX first (or closest) rows."""
    if not rows:
        return f'<p class="ok">No {none} {what}.</p>'
    shown = f", the {which} {LIST_MAX} below" if len(rows) > LIST_MAX else ""
    return f'<p class="warn">{some} {what}: {count}{shown}.</p>' + _scroll(_table(head, rows[:LIST_MAX]))


def _curves(run_dir: Path) -> str:
    history = _csv(run_dir / "history.csv")
    image = _png(run_dir, "curves.png", "loss and accuracy per epoch, train and val, best epoch marked")
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    rows = [[int(r["epoch"])] + [_num(float(r[c])) for c in cols[1:]] for r in history]
    return image + f"<details><summary>history.csv: {len(rows)} epoch{_s(rows)}</summary>{_scroll(_table(cols, rows))}</details>"


def _confusion(run_dir: Path, metrics: dict[str, Any]) -> str:
    parts = [
        f"<div><h3>{split}</h3>"
        + _png(run_dir, f"confusion_matrix_{split}.png", f"confusion matrix on {split}")
        + _confused_pairs(metrics[split]["confusion_matrix"], metrics["classes"]) + "</div>"
        for split in EVALUATED if split in metrics
    ]
    layout = "pair" if len(metrics["classes"]) <= SIDE_BY_SIDE_CLASSES else "stack"
    return f'<div class="{layout}">{"".join(parts)}</div>'


def _calibration(run_dir: Path, metrics: dict[str, Any]) -> str:
    if "tta" not in metrics:  # metrics.json of an imgcls that did not yet measure calibration
        return '<p class="warn">This run recorded no calibration (no ECE in metrics.json).</p>'
    parts = [
        f"<div><h3>{split}: ECE {_num(metrics[split]['ece'])}</h3>"
        + _png(run_dir, f"reliability_{split}.png", f"reliability diagram on {split}") + "</div>"
        for split in EVALUATED if split in metrics
    ]
    tta = {"none": "the centre crop", "flip": "the mean logits of the centre crop and its mirror"}[metrics["tta"]]
    return (f"<p>Accuracy per top-class confidence bin (15 equal-width bins) against the diagonal of a calibrated "
            f"model; expected calibration error (ECE) in the headings. Evaluated on {tta} (evaluate.tta). "
            f"<code>python -m imgcls.calibrate</code> fits a temperature on val that predict then applies.</p>"
            f'<div class="pair">{"".join(parts)}</div>')


def _confused_pairs(matrix: list[list[int]], classes: list[str], top: int = 10) -> str:
    """The largest off-diagonal cells: what a matrix of many classes shows too small to read."""
    cells = sorted((-count, i, j) for i, row in enumerate(matrix) for j, count in enumerate(row) if i != j and count)
    if not cells:
        return '<p class="ok">No image confused.</p>'
    rows = [[classes[i], classes[j], -neg, _pct(-neg / sum(matrix[i]))] for neg, i, j in cells[:top]]
    return _table(["true", "predicted as", "images", "of the true class"], rows)


def _per_class(metrics: dict[str, Any]) -> str:
    splits = [s for s in EVALUATED if s in metrics]
    head = ["class"] + [k for _ in splits for k in ("precision", "recall", "F1", "support")]
    rows = [[c] + [v for s in splits for v in _class_cells(metrics[s]["per_class"][c])] for c in metrics["classes"]]
    return _scroll(_table(head, rows, groups=[("", 1), *((s, 4) for s in splits)]))


def _class_cells(m: dict[str, Any]) -> list[Any]:
    return [_num(m["precision"]), _num(m["recall"]), _num(m["f1"]), m["support"]]


def _gallery(run_dir: Path, manifest: dict) -> str:
    split = "test" if (run_dir / "predictions_test.csv").is_file() else "val"
    rows = _csv(run_dir / f"predictions_{split}.csv")
    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["p_predicted"]))
    if not wrong:
        return f'<p class="ok">Every {split} image is classified correctly.</p>'
    info = manifest["data"]["splits"][split]
    folder = split_folder(info["root"], run_dir)
    # The CSV holds names text_safe; the manifest holds them exactly, as the file system does.
    exact = {text_safe(f["path"]): f["path"] for f in info["files"]}
    shown = wrong[:GALLERY_MAX]
    note = (f"<p>{len(wrong)} of {len(rows)} {split} images misclassified"
            + (f"; the {len(shown)} most confident mistakes" if len(shown) < len(wrong) else "")
            + ". Worst first: the highest probability given to a wrong class. Each shows the true class, "
            "the predicted class and its probability.</p>")
    figures = "".join(_figure(folder, exact.get(r["path"], r["path"]), r) for r in shown)
    return note + f'<div class="gallery">{figures}</div>'


def _figure(folder: Path | None, path: str, row: dict[str, str]) -> str:
    thumb = thumbnail(folder / path) if folder is not None else None
    picture = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{_e(path)}">' if thumb
               else '<div class="noimg">image not found</div>')
    return (
        f'<figure>{picture}<figcaption><div class="true" title="true class">{_e(row["true"])}</div>'
        f'<div><span class="pred" title="predicted class">→ {_e(row["predicted"])}</span>'
        f' <span class="p">{float(row["p_predicted"]):.2f}</span></div>'
        f'<div class="path" title="{_e(path)}">{_e(path)}</div></figcaption></figure>'
    )


def _provenance(run_dir: Path, manifest: dict) -> str:
    data = manifest["data"]
    files = [[name, provenance.file_sha256(run_dir / name)] for name in ("config.toml", "manifest.json")]
    digests = [["all splits", sum(info["images"] for info in data["splits"].values()), data["digest"]]]
    digests += [[s, info["images"], info["digest"]] for s, info in data["splits"].items()]
    facts = [["weights", _flat(manifest["weights"])], ["code", _flat(manifest["code"])]]
    for key, value in manifest["environment"].items():
        if key == "variables":
            value = {k: v for k, v in value.items() if v is not None} or "none set"
        facts.append([key, _flat(value)])
    return "".join([
        ("<p>Two runs with the same digests ran the same experiment on the same images. "
         "<code>sha256sum config.toml manifest.json</code> prints the first two.</p>"),
        _table(["file", "SHA-256"], files, code_cols={1}),
        "<h3>Data</h3><p>Each split's digest covers every file's path, class and content; moving the folder changes none.</p>",
        _table(["split", "images", "SHA-256"], digests, code_cols={2}),
        "<h3>Code and environment</h3><p>What can change a run's bits.</p>",
        _table(["what", "value"], facts),
    ])


# ------------------------------------------------------------------ reading the run's files


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _json(path: Path) -> Any:
    return json.loads(_text(path))


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(_text(path))))


def split_folder(root: str, run_dir: Path) -> Path | None:
    """Where a split's files are now. A relative root started at the run's working directory, which
    no file records: try here (where the run itself writes its page), then each folder above the run."""
    for base in (Path.cwd(), *run_dir.resolve().parents):
        if (base / root).is_dir():
            return base / root
    return None


def _dimensions(folder: Path | None, relative: str) -> tuple[int, int] | None:
    if folder is None:
        return None
    try:
        with Image.open(folder / relative) as img:  # reads the header only
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def thumbnail(path: Path) -> str | None:
    """A JPEG, upright, shorter side at most THUMB_SIDE and longer side at most 4x that, base64-encoded."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # a JPEG decodes at 1/2..1/8 scale: a 24 MP photo in milliseconds
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    scale = min(1.0, THUMB_SIDE / min(img.size), 4 * THUMB_SIDE / max(img.size))  # a panorama stays bounded
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png(run_dir: Path, name: str, alt: str) -> str:
    path = run_dir / name
    if not path.is_file():
        return f'<p class="warn">{_e(name)} is not in the run directory.</p>'
    if path.stat().st_size > INLINE_PNG_MAX:
        return f'<p><a href="{_e(name)}">{_e(name)}</a> ({_bytes(path.stat().st_size)}: too large to inline).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    # The link opens the file at full size when the page is read inside its run folder.
    return (f'<a href="{_e(name)}" title="{_e(name)} at full size"><img class="plot" src="data:image/png;base64,{data}" '
            f'alt="{_e(alt)}"></a>')


# ------------------------------------------------------------------ HTML pieces


def _pre(text: str) -> str:
    """As `_e`, but line breaks stay line breaks: for a file shown as it is."""
    return "\n".join(_e(line) for line in text.split("\n"))


def _table(
    head: list[str], rows: Iterable[list[Any]], total_row: bool = False, code_cols: set[int] = frozenset(),
    groups: list[tuple[str, int]] = (),
) -> str:
    """Numbers (int, float, Num) right-aligned; every cell escaped. A class named "12" stays text.
    groups: (title, columns spanned) for a header row above `head`."""
    def cell(i: int, v: Any) -> str:
        cls = "num" if isinstance(v, (int, float, Num)) else ("code" if i in code_cols else "")
        return f'<td class="{cls}">{_e(v)}</td>' if cls else f"<td>{_e(v)}</td>"

    rows = list(rows)
    body = "".join(
        ('<tr class="total">' if total_row and k == len(rows) - 1 else "<tr>") + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>"
        for k, r in enumerate(rows)
    )
    above = "".join(f'<th colspan="{n}" class="group">{_e(g)}</th>' for g, n in groups)
    heads = (f"<tr>{above}</tr>" if groups else "") + f"<tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>"
    return f"<table><thead>{heads}</thead><tbody>{body}</tbody></table>"


class Num(str):
    """A formatted number: right-aligned in a table."""


def _scroll(inner: str) -> str:
    return f'<div class="scroll">{inner}</div>'


def _list(items: list[str]) -> str:
    more = f"<li>… and {len(items) - LIST_MAX} more</li>" if len(items) > LIST_MAX else ""
    return "<ul>" + "".join(f"<li><code>{_e(i)}</code></li>" for i in items[:LIST_MAX]) + more + "</ul>"


def _s(items: list) -> str:
    return "" if len(items) == 1 else "s"


def _pct(x: float) -> Num:
    return Num(f"{100 * x:.1f}%")


def _num(x: float) -> Num:
    return Num(f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _spread(values: list[int]) -> Num:
    """min / median / max, or the one value all share."""
    if not values:
        return Num("not read")
    low, mid, high = min(values), int(statistics.median(values)), max(values)
    return Num(str(low) if low == high else f"{low} / {mid} / {high}")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --soft: #f5f7fa; --accent: #2563eb; --ok: #1e7b4a; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: var(--soft); border-bottom: 1px solid var(--line); padding: 22px max(24px, calc(50% - 516px)) 0; }
.kicker { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .06em; }
h1 { margin: 0 0 16px; font-size: 26px; font-weight: 650; overflow-wrap: anywhere; }
h2 { font-size: 20px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 13px; margin: 24px 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
p { margin: 8px 0; max-width: 52em; }
nav { display: flex; flex-wrap: wrap; gap: 4px 18px; padding: 14px 0 12px; font-size: 14px; }
nav a, a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
main { max-width: 1080px; margin: 0 auto; padding: 8px 24px 64px; }
section { margin-top: 40px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .label { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { font-size: 13px; color: var(--muted); min-height: 1em; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; margin: 8px 0;
  font: 13px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; overflow: auto; max-height: 28em; }
code, td.code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 14px; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
thead tr:nth-child(2) th { top: 31px; }
th.group { text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tr.total td { font-weight: 600; background: var(--soft); }
.scroll { max-height: 30em; overflow: auto; display: inline-block; max-width: 100%; vertical-align: top; }
.scroll table { margin: 0; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; display: block; margin: 8px 0; }
.pair { display: flex; flex-wrap: wrap; gap: 0 32px; } .pair > div { flex: 1 1 400px; min-width: 0; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--accent); }
.ok { color: var(--ok); } .warn { color: #a1460a; }
.warnbox { border: 1px solid #f3c98b; background: #fff8eb; border-radius: 6px; padding: 8px 14px; margin: 8px 0 0; }
.warnbox ul { margin: 4px 0; padding-left: 20px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
figure img, .noimg { display: block; margin: 0 auto 6px; max-width: 100%; height: 96px; object-fit: contain; }
.noimg { width: 96px; background: var(--soft); color: var(--muted); font-size: 12px; display: flex; align-items: center; justify-content: center; text-align: center; }
figcaption { font-size: 13px; line-height: 1.35; overflow-wrap: anywhere; }
figcaption .true { color: var(--ok); font-weight: 600; } figcaption .pred { color: var(--bad); font-weight: 600; }
figcaption .p { float: right; font-variant-numeric: tabular-nums; color: var(--muted); }
figcaption .path { color: var(--muted); font-size: 11px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; margin-top: 2px; }
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.page", description="Write a finished run's report.html.")
    parser.add_argument("run_dir", help="the run's folder: <output.root>/<name>")
    args = parser.parse_args(argv)

    def go() -> int:
        print(write_report(Path(args.run_dir)))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
