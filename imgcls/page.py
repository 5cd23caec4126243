"""The run page: report.html, one self-contained file a person opens to read a finished run.

`python -m imgcls.page RUN_DIR` (re)writes RUN_DIR/report.html from the run's files alone.

Everything is inline (CSS, PNGs and thumbnails as data: URIs), nothing is fetched and no script
runs, so the page opens from a file:// URL, a mail attachment or an archive years later. Every
string from the run (class and file names can hold any character) goes through html.escape.
Sizes stay bounded for 1,000 classes: tables grow by a row per class, lists and the gallery are
capped, and a confusion-matrix PNG too large to inline is linked instead.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, ImageOps

from imgcls import stats
from imgcls.checkpoint import atomic_write
from imgcls.errors import UserError, guarded

GALLERY_MAX = 48
THUMB_SIDE = 96  # pixels on the shorter side
LIST_MAX = 50  # rows shown of leakage, near-duplicate and conflict lists
SIZE_SAMPLE = 200  # image headers read per split for pixel sizes
INLINE_PNG_MAX = 4 * 2**20  # bytes; a larger plot (thousands of classes) is linked, not inlined
SPLITS = ("train", "val", "test")


def write_report(run_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write run_dir/report.html and return its path. `metrics` is what metrics.json holds (or will:
    the run writes the page before metrics.json, which must stay its last file); read when None."""
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = _json(run_dir / "metrics.json")
    preflight, manifest = _json(run_dir / "preflight.json"), _json(run_dir / "manifest.json")
    config_text = _text(run_dir / "config.toml")
    name = tomllib.loads(config_text).get("name", run_dir.name) if config_text else run_dir.name
    sections = [
        ("experiment", "Experiment", _experiment(config_text)),
        ("data", "Data card", _data_card(run_dir, preflight, manifest, metrics)),
        ("curves", "Learning curves", _curves(run_dir)),
        ("confusion", "Confusion matrices", _confusion(run_dir, metrics)),
        ("per-class", "Per-class metrics", _per_class(metrics)),
        ("gallery", "Misclassified images", _gallery(run_dir, manifest)),
        ("provenance", "Manifest and environment", _provenance(manifest)),
    ]
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{content}</section>' for sid, title, content in sections)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(name)}: imgcls run</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(name)}</h1>{_headline(metrics)}<nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )
    path = run_dir / "report.html"
    atomic_write(path, page)
    return path


# ------------------------------------------------------------------ sections


def _headline(metrics: dict[str, Any]) -> str:
    cards = [
        (f"{split} accuracy", _pct(metrics[split]["accuracy"]), f"macro-F1 {_num(metrics[split]['macro_f1'])}")
        for split in ("val", "test") if split in metrics
    ]
    if "best_epoch" in metrics:
        cards.append(("best epoch", str(metrics["best_epoch"]), f"of {metrics.get('epochs_run', '?')} run"
                      + (", stopped early" if metrics.get("stopped_early") else "")))
    cards.append(("classes", str(len(metrics.get("classes", []))), ""))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{_e(v)}</div><div class="sub">{_e(s)}</div></div>'
        for k, v, s in cards
    ) + "</div>"


def _experiment(config_text: str | None) -> str:
    if config_text is None:
        return _missing("config.toml")
    return f"<p>The resolved experiment (<code>config.toml</code>): every default filled in.</p><pre>{_e(config_text)}</pre>"


def _data_card(run_dir: Path, preflight: dict | None, manifest: dict | None, metrics: dict[str, Any]) -> str:
    if preflight is None:
        return _missing("preflight.json")
    splits = {s: preflight["splits"][s] for s in SPLITS if s in preflight["splits"]}
    classes = preflight["classes"]
    rows = [[c, *(splits[s]["per_class"].get(c, 0) for s in splits)] for c in classes]
    rows.append(["all", *(splits[s]["images"] for s in splits)])
    parts = ["<h3>Images per class</h3>", _scroll(_table(["class", *splits], rows, total_row=True))]
    parts.append("<h3>What the numbers can say</h3>" + _baselines(splits, metrics))
    if manifest is not None:
        parts.append("<h3>Image sizes</h3>" + _sizes(run_dir, manifest))
    parts.append("<h3>Files left out</h3>" + _left_out(splits, preflight["bad_images"]))
    parts.append("<h3>Copies across splits and labels</h3>" + _copies(preflight))
    return "".join(parts)


def _baselines(splits: dict[str, dict], metrics: dict[str, Any]) -> str:
    """Accuracy against always answering train's largest class, and how wide a 95% Wilson interval is
    at the observed accuracy for the split's size: a difference smaller than that is not evidence."""
    train = splits["train"]["per_class"]
    majority = max(train, key=lambda c: train[c])  # first of the largest in class order
    rows = []
    for split in ("val", "test"):
        if split not in splits or split not in metrics or splits[split]["images"] == 0:
            continue
        n, acc = splits[split]["images"], metrics[split]["accuracy"]
        interval = stats.accuracy_interval(round(acc * n), n)
        baseline = splits[split]["per_class"].get(majority, 0) / n
        rows.append([split, n, _pct(acc), _pct(baseline), Num(f"{_pct(interval.low)} to {_pct(interval.high)}"),
                     Num(f"±{interval.width * 50:.1f} pts")])
    note = (f"<p>Majority baseline: always answering <b>{_e(majority)}</b>, the largest training class. "
            "The interval is the 95% Wilson score interval for the observed accuracy on that many images.</p>")
    return note + _table(["split", "images", "accuracy", "majority baseline", "95% interval", "half-width"], rows)


def _sizes(run_dir: Path, manifest: dict) -> str:
    rows = []
    for split, info in manifest["data"]["splits"].items():
        files = info["files"]
        if not files:
            continue
        nbytes = [f["size"] for f in files]
        folder = _split_folder(info["root"], run_dir)
        step = max(1, len(files) // SIZE_SAMPLE)
        dims = [d for f in files[::step][:SIZE_SAMPLE] if (d := _dimensions(folder, f["path"])) is not None]
        pixels = "not found" if not dims else (
            f"{_range([w for w, _ in dims])} × {_range([h for _, h in dims])}" + (f" ({len(dims)} sampled)" if step > 1 else "")
        )
        rows.append([split, len(files), Num(_bytes(statistics.median(nbytes))), Num(_bytes(sum(nbytes))), Num(pixels)])
    return _table(["split", "files", "median file", "total", "width × height px (min–median–max)"], rows)


def _left_out(splits: dict[str, dict], bad_images: list[str]) -> str:
    rows = [[split, reason, count] for split, info in splits.items() for reason, count in sorted(info["skipped_files"].items())]
    skipped = _table(["split", "skipped (not images)", "files"], rows) if rows else "<p>No files skipped.</p>"
    bad = (f"<p>{len(bad_images)} unreadable image(s) left out:</p>" + _list(bad_images)) if bad_images else "<p>No unreadable images.</p>"
    return skipped + bad


def _copies(preflight: dict) -> str:
    leakage, near = preflight.get("leakage", []), preflight.get("near_duplicates", [])
    conflicts = preflight.get("label_conflicts", [])
    parts = [
        _finding(len(leakage), "byte-identical file(s) in train and val/test", ["train", "val/test"], [list(p) for p in leakage]),
        _finding(len(near), "val/test image(s) within a few bits of a training image (resized or re-encoded copies)",
                 ["train", "val/test", "bits apart"], [[p["train"], p["other"], p["bits"]] for p in near]),
        _finding(len(conflicts), "photo(s) under two classes", ["file", "class", "file", "class", "bits apart"],
                 [[p["a"], p["class_a"], p["b"], p["class_b"], p["bits"]] for p in conflicts]),
    ]
    return "".join(parts)


def _finding(count: int, what: str, head: list[str], rows: list[list]) -> str:
    if not count:
        return f'<p class="ok">No {_e(what)}.</p>'
    more = f" (the first {LIST_MAX} shown)" if count > LIST_MAX else ""
    return f'<p class="warn">{count} {_e(what)}{more}:</p>' + _scroll(_table(head, rows[:LIST_MAX]))


def _curves(run_dir: Path) -> str:
    history = _csv(run_dir / "history.csv")
    image = _png(run_dir, "curves.png", "loss and accuracy per epoch, train and val, best epoch marked")
    if history is None:
        return image
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    rows = [[r.get(c, "") if c == "epoch" else _num(float(r[c])) for c in cols] for r in history if r.get("epoch")]
    return image + f"<details><summary>history.csv ({len(rows)} epochs)</summary>{_table(cols, rows)}</details>"


def _confusion(run_dir: Path, metrics: dict[str, Any]) -> str:
    parts = []
    for split in ("val", "test"):
        if split not in metrics:
            continue
        parts.append(f"<h3>{split}</h3>" + _png(run_dir, f"confusion_matrix_{split}.png", f"confusion matrix on {split}"))
        parts.append(_confused_pairs(metrics[split]["confusion_matrix"], metrics["classes"]))
    return "".join(parts) or "<p>No evaluated split.</p>"


def _confused_pairs(matrix: list[list[int]], classes: list[str], top: int = 10) -> str:
    """The largest off-diagonal cells: what a matrix of many classes shows too small to read."""
    cells = sorted(((-matrix[i][j], i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j and matrix[i][j]))
    if not cells:
        return '<p class="ok">No image confused.</p>'
    rows = [[classes[i], classes[j], -neg, _pct(-neg / max(1, sum(matrix[i])))] for neg, i, j in cells[:top]]
    return _table(["true", "predicted as", "images", "of the true class"], rows)


def _per_class(metrics: dict[str, Any]) -> str:
    splits = [s for s in ("val", "test") if s in metrics]
    if not splits:
        return "<p>No evaluated split.</p>"
    head = ["class"] + [k for _ in splits for k in ("precision", "recall", "F1", "support")]
    rows = [
        [c] + [v for s in splits for v in _class_cells(metrics[s]["per_class"].get(c))]
        for c in metrics["classes"]
    ]
    return _scroll(_table(head, rows, groups=[("", 1), *((s, 4) for s in splits)]))


def _class_cells(m: dict[str, Any] | None) -> list[Any]:
    if m is None:
        return ["", "", "", ""]
    return [_num(m["precision"]), _num(m["recall"]), _num(m["f1"]), m["support"]]


def _gallery(run_dir: Path, manifest: dict | None) -> str:
    split = "test" if (run_dir / "predictions_test.csv").exists() else "val"
    rows = _csv(run_dir / f"predictions_{split}.csv")
    if rows is None:
        return _missing(f"predictions_{split}.csv")
    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["p_predicted"]))
    if not wrong:
        return f'<p class="ok">Every {split} image is classified correctly.</p>'
    root = manifest["data"]["splits"][split]["root"] if manifest and split in manifest["data"]["splits"] else None
    folder = _split_folder(root, run_dir) if root is not None else None
    shown = wrong[:GALLERY_MAX]
    note = (f"<p>{len(wrong)} of {len(rows)} {split} images misclassified; the {len(shown)} most confident mistakes "
            "first (highest probability given to the wrong class).</p>")
    return note + '<div class="gallery">' + "".join(_figure(folder, r) for r in shown) + "</div>"


def _figure(folder: Path | None, row: dict[str, str]) -> str:
    thumb = _thumbnail(folder / row["path"]) if folder is not None else None
    picture = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{_e(row["path"])}">' if thumb
               else '<div class="noimg">image not found</div>')
    return (
        f'<figure>{picture}<figcaption><span class="true">{_e(row["true"])}</span> → '
        f'<span class="pred">{_e(row["predicted"])}</span> <span class="p">{float(row["p_predicted"]):.2f}</span>'
        f'<span class="path" title="{_e(row["path"])}">{_e(row["path"])}</span></figcaption></figure>'
    )


def _provenance(manifest: dict | None) -> str:
    if manifest is None:
        return _missing("manifest.json")
    data = manifest["data"]
    digests = [["data", "", data["digest"]]] + [[s, info["images"], info["digest"]] for s, info in data["splits"].items()]
    parts = ["<h3>Data</h3>", _table(["what", "images", "SHA-256"], digests, code_cols={2})]
    facts = [["weights", _flat(manifest.get("weights"))], ["code", _flat(manifest.get("code"))]]
    env = manifest.get("environment", {})
    for key, value in env.items():
        if key == "variables":
            value = {k: v for k, v in (value or {}).items() if v is not None} or "none set"
        facts.append([key, _flat(value)])
    parts += ["<h3>Code and environment</h3>", _table(["", "value"], facts)]
    return "".join(parts)


# ------------------------------------------------------------------ reading the run's files


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _json(path: Path) -> Any:
    text = _text(path)
    return None if text is None else json.loads(text)


def _csv(path: Path) -> list[dict[str, str]] | None:
    text = _text(path)
    return None if text is None else list(csv.DictReader(io.StringIO(text)))


def _split_folder(root: str, run_dir: Path) -> Path | None:
    """Where a split's files are now. A relative root started at the run's working directory, which
    no file records: try here, then each folder above the run directory."""
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


def _thumbnail(path: Path) -> str | None:
    """A JPEG, upright, shorter side THUMB_SIDE (longer side at most 4x that), base64-encoded."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    scale = min(THUMB_SIDE / min(img.size), 4 * THUMB_SIDE / max(img.size))  # a panorama stays bounded
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png(run_dir: Path, name: str, alt: str) -> str:
    path = run_dir / name
    if not path.exists():
        return _missing(name)
    if path.stat().st_size > INLINE_PNG_MAX:
        return f'<p><a href="{_e(name)}">{_e(name)}</a> ({_bytes(path.stat().st_size)}: too large to inline).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


# ------------------------------------------------------------------ HTML pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
        f'<tr{" class=total" if total_row and k == len(rows) - 1 else ""}>' + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>"
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


def _missing(name: str) -> str:
    return f'<p class="warn">{_e(name)} is not in the run directory.</p>'


def _pct(x: float) -> Num:
    return Num(f"{100 * x:.1f}%")


def _num(x: float) -> Num:
    return Num(f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _range(values: list[int]) -> str:
    return f"{min(values)}–{int(statistics.median(values))}–{max(values)}"


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --soft: #f5f7fa; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: var(--soft); border-bottom: 1px solid var(--line); padding: 24px max(24px, calc(50% - 516px)) 0; }
h1 { margin: 0 0 16px; font-size: 26px; font-weight: 650; overflow-wrap: anywhere; }
h2 { font-size: 20px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
nav { display: flex; flex-wrap: wrap; gap: 4px 18px; padding: 14px 0 12px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; } nav a:hover { text-decoration: underline; }
main { max-width: 1080px; margin: 0 auto; padding: 8px 24px 64px; }
section { margin-top: 36px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .label { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { font-size: 13px; color: var(--muted); min-height: 1em; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  font: 13px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; overflow: auto; max-height: 40em; }
code, td.code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 14px; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: var(--soft); font-weight: 600; }
th.group { text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tr.total td { font-weight: 600; background: var(--soft); }
.scroll { max-height: 30em; overflow: auto; display: inline-block; max-width: 100%; border-bottom: 1px solid var(--line); }
.scroll table { margin: 0; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; display: block; margin: 8px 0; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--accent); }
.ok { color: #1e7b4a; } .warn { color: #a1460a; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fff; }
figure img, .noimg { display: block; margin: 0 auto; max-width: 100%; height: 96px; object-fit: contain; }
.noimg { width: 96px; background: var(--soft); color: var(--muted); font-size: 12px; display: flex; align-items: center; justify-content: center; text-align: center; }
figcaption { font-size: 12.5px; margin-top: 6px; overflow-wrap: anywhere; }
figcaption .true { color: #1e7b4a; font-weight: 600; } figcaption .pred { color: #b42318; font-weight: 600; }
figcaption .p { float: right; font-variant-numeric: tabular-nums; color: var(--muted); }
figcaption .path { display: block; color: var(--muted); font-size: 11px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m imgcls.page RUN_DIR", file=sys.stderr)
        return 2

    def go() -> int:
        run_dir = Path(args[0])
        if not (run_dir / "metrics.json").is_file():
            raise UserError(f"{run_dir}: no metrics.json; a report needs a finished run directory")
        print(write_report(run_dir))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
