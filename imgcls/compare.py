"""Compare finished runs: what differed (experiment, data, environment) and what it did to the results.

`python -m imgcls.compare RUN_A RUN_B [RUN_C ...] [--json] [--html FILE]`

RUN_A is the baseline: every other run is diffed and tested against it. Two runs scored on the same
images (equal split digests) are compared image by image: exact McNemar, a paired bootstrap interval
on the accuracy difference, and the images that flipped. Three or more runs are also ranked.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls import config, stats
from imgcls.errors import ConfigError, UserError, guarded
from imgcls.rundir import MANIFEST, TIMINGS, data_changes

BOOTSTRAP_SEED = 0  # fixed, so a comparison prints the same interval every time
SPLITS = ("val", "test")
# `name` only picks the run's folder (and titles its plots): it differs between any two runs of a root.
NAME_ONLY = {"name"}
# timings.json's machine facts that differ between any two starts by nature, so they tell nothing.
ALWAYS_DIFFERENT = {"started"}


@dataclass(frozen=True)
class Run:
    """One finished run directory, read once."""

    path: Path
    exp: config.Experiment
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    predictions: dict[str, dict[str, bool]]  # split -> image path -> predicted correctly, in file order
    machine: dict[str, Any]  # timings.json "machine": facts that cannot change bits


def load_run(path: str | Path) -> Run:
    """Read a finished run directory, or raise naming the folder and every file it lacks."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory (no such folder)")
    splits = [s for s in SPLITS if (path / f"predictions_{s}.csv").exists() or s == "val"]
    missing = [n for n in ("config.toml", MANIFEST, "metrics.json", *(f"predictions_{s}.csv" for s in splits)) if not (path / n).is_file()]
    if missing:
        hint = "; an unfinished run completes with --resume" if (path / "config.toml").is_file() else ""
        raise UserError(f"{path}: not a finished run directory: missing {', '.join(missing)}{hint}")
    try:
        exp = config.load(path / "config.toml")
        manifest, metrics = (json.loads((path / n).read_text()) for n in (MANIFEST, "metrics.json"))
    except (ValueError, ConfigError) as e:
        raise UserError(f"{path}: damaged run file: {e}") from None
    predictions = {s: _read_predictions(path / f"predictions_{s}.csv") for s in splits}
    try:  # timings.json holds no result; a copied run may lack it, and then only its machine is unknown
        machine = {k: v for k, v in json.loads((path / TIMINGS).read_text())["machine"].items() if k not in ALWAYS_DIFFERENT}
    except (OSError, ValueError, KeyError):
        machine = {}
    return Run(path, exp, manifest, metrics, predictions, machine)


def _read_predictions(path: Path) -> dict[str, bool]:
    with open(path, newline="") as f:
        return {row["path"]: row["true"] == row["predicted"] for row in csv.DictReader(f)}


# ------------------------------------------------------------------------------------ the facts


def compare(runs: list[Run]) -> dict[str, Any]:
    """Every fact of the comparison as one JSON-ready document (the text and HTML views render it)."""
    base = runs[0]
    changed = list(dict.fromkeys(k for r in runs[1:] for k in config.changed_keys(base.exp, r.exp)))
    trees = [r.exp.model_dump(mode="json") for r in runs]
    keys = [{"key": k, "values": [_value(t, k) for t in trees]} for k in changed]
    neutral = config.RESULT_NEUTRAL | NAME_ONLY
    names = [r.path.name for r in runs]
    result = {
        "runs": [str(r.path) for r in runs],
        "labels": names if len(set(names)) == len(names) else [str(r.path) for r in runs],
        "experiment": {
            "changes_results": [k for k in keys if k["key"] not in neutral],
            "cannot_change_results": [k for k in keys if k["key"] in neutral],
        },
        "data": _data(runs),
        "environment": {
            "can_change_bits": _differing([r.manifest["environment"] for r in runs]),
            "cannot_change_bits": _differing([r.machine for r in runs]),
        },
        "metrics": _metrics(runs),
        "paired": [_paired(base, r, i, s) for i, r in enumerate(runs[1:], 1) for s in SPLITS if s in base.metrics or s in r.metrics],
    }
    if len(runs) >= 3:
        result["ranking"] = ranking(runs)
    return result


def _value(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _differing(facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = dict.fromkeys(k for f in facts for k in f)
    return [{"key": k, "values": [f.get(k) for f in facts]} for k in keys if any(f.get(k) != facts[0].get(k) for f in facts)]


def _data(runs: list[Run]) -> dict[str, Any]:
    splits = dict.fromkeys(s for r in runs for s in r.manifest["data"]["splits"])
    per_split = {}
    for s in splits:
        manifests = [r.manifest["data"]["splits"].get(s, {}) for r in runs]
        per_split[s] = {
            "digests": [m.get("digest") for m in manifests],
            "class_counts": [dict(sorted(Counter(f["class"] for f in m.get("files", [])).items())) for m in manifests],
        }
    changes = [{"runs": [0, i], "changes": data_changes(runs[0].manifest, r.manifest)} for i, r in enumerate(runs[1:], 1)]
    return {"splits": per_split, "changes": changes}


def _metrics(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows of (split, metric, one value per run, deltas against the first run)."""
    rows = []
    for s in SPLITS:
        found = [r.metrics.get(s) for r in runs]
        if not any(found):
            continue
        classes = dict.fromkeys(c for m in found if m for c in m["per_class"])
        names = {"accuracy": ("accuracy",), "macro_f1": ("macro_f1",), **{f"f1 {c}": ("per_class", c, "f1") for c in classes}}
        for name, where in names.items():
            values = [_dig(m, where) for m in found]
            deltas = [None if v is None or values[0] is None else v - values[0] for v in values]
            rows.append({"split": s, "metric": name, "values": values, "deltas": deltas})
    return rows


def _dig(tree: Any, where: tuple[str, ...]) -> Any:
    for part in where:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _paired(a: Run, b: Run, index: int, split: str) -> dict[str, Any]:
    """McNemar, bootstrap and flipped images, only where both runs scored the very same images."""
    out: dict[str, Any] = {"runs": [0, index], "split": split}
    digests = [r.manifest["data"]["splits"].get(split, {}).get("digest") for r in (a, b)]
    if None in digests or split not in a.predictions or split not in b.predictions:
        return out | {"reason": f"{split} was not evaluated in both runs"}
    if digests[0] != digests[1]:
        return out | {"reason": f"{split} images differ (split digests {digests[0][:12]} vs {digests[1][:12]}): no paired test"}
    paths = list(a.predictions[split])
    ca = np.array([a.predictions[split][p] for p in paths])
    cb = np.array([b.predictions[split][p] for p in paths])
    a_only, b_only = stats.flipped(paths, ca, cb)
    interval = stats.paired_bootstrap(ca, cb, seed=BOOTSTRAP_SEED)
    return out | {
        "images": len(paths), "b": len(a_only), "c": len(b_only),
        "mcnemar_p": stats.mcnemar_exact(len(a_only), len(b_only)),
        "accuracy_difference": {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "seed": BOOTSTRAP_SEED},
        "flipped": {"right_in_a_only": a_only, "right_in_b_only": b_only},
    }


def ranking(runs: list[Run]) -> dict[str, Any]:
    """Runs best first by the selection metric (train.select_best), each with a Wilson 95% interval
    on val accuracy. Runs that select by different metrics are ranked by the first run's."""
    metric = runs[0].exp.train.select_best
    mixed = len({r.exp.train.select_best for r in runs}) > 1
    key = (lambda r: r.metrics["val"]["loss"]) if metric == "val_loss" else (lambda r: -r.metrics["val"]["accuracy"])
    rows = []
    for r in sorted(runs, key=key):
        val = r.metrics["val"]
        wilson = stats.accuracy_interval(round(val["accuracy"] * val["images"]), val["images"])
        rows.append({"run": str(r.path), "select_best": r.exp.train.select_best, "val_loss": val["loss"], "val_acc": val["accuracy"], "low": wilson.low, "high": wilson.high})
    return {"by": metric, "mixed": mixed, "rows": rows}


# ------------------------------------------------------------------------------------ the views


def _fmt(v: float | None) -> str:
    """A metric: four decimals, or four digits when it is tiny."""
    return "-" if v is None else f"{v:.4g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"


def _show(v: Any) -> str:
    """A config or environment value as describe_changes writes it."""
    return "absent" if v is None else json.dumps(v)


def table(rows: list[list[str]]) -> str:
    """Plain-text columns, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _ranking_rows(rank: dict[str, Any]) -> list[list[str]]:
    rows = [["#", "run", "val loss", "val acc", "val acc 95% (Wilson)"]]
    return rows + [[str(i), r["run"], _fmt(r["val_loss"]), _fmt(r["val_acc"]), f"[{r['low']:.3f}, {r['high']:.3f}]"] for i, r in enumerate(rank["rows"], 1)]


def _ranking_title(rank: dict[str, Any]) -> str:
    return f"ranked by {rank['by']}" + (" (the runs select by different metrics; the first run's is used)" if rank["mixed"] else "")


def ranking_text(rank: dict[str, Any]) -> str:
    return f"{_ranking_title(rank)}\n{table(_ranking_rows(rank))}"


def _sections(result: dict[str, Any]) -> list[tuple[str, list[list[str]] | list[str]]]:
    """(title, table rows or lines) pairs: the one layout both the terminal and the HTML page render."""
    labels = result["labels"]
    exp, env = result["experiment"], result["environment"]
    out: list[tuple[str, Any]] = [("runs", [[str(i), p] for i, p in enumerate(result["runs"])])]
    for title, keys in (("experiment: changes results", exp["changes_results"]), ("experiment: cannot change results", exp["cannot_change_results"]),
                        ("environment: can change bits", env["can_change_bits"]), ("environment: cannot change bits", env["cannot_change_bits"])):
        out.append((title, [["key", *labels]] + [[k["key"], *map(_show, k["values"])] for k in keys] if keys else ["none"]))
    counts = [[f"{s} ({c})", *(str(n.get(c, 0)) for n in d["class_counts"])]
              for s, d in result["data"]["splits"].items() for c in dict.fromkeys(c for n in d["class_counts"] for c in n)]
    out.append(("data: images per class", [["split (class)", *labels], *counts]))
    out.append(("data: files changed", [f"{labels[0]} -> {labels[ch['runs'][1]]}: {line}" for ch in result["data"]["changes"] for line in ch["changes"]] or ["none"]))
    metric_rows = [["split", "metric", *labels, *(f"delta {x}" for x in labels[1:])]]
    metric_rows += [[m["split"], m["metric"], *map(_fmt, m["values"]), *(f"{d:+.4f}" if d is not None else "-" for d in m["deltas"][1:])] for m in result["metrics"]]
    out.append(("results", metric_rows))
    paired, flips = [["split", "runs", "images", "b", "c", "McNemar p", "acc(B)-acc(A), 95% bootstrap"]], []
    for p in result["paired"]:
        pair = " vs ".join(labels[i] for i in p["runs"])
        if "reason" in p:
            paired.append([p["split"], pair, "-", "-", "-", "-", p["reason"]])
            continue
        d = p["accuracy_difference"]
        paired.append([p["split"], pair, str(p["images"]), str(p["b"]), str(p["c"]), f"{p['mcnemar_p']:.4g}", f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"])
        flips += [f"{p['split']} {pair}: right only in {labels[p['runs'][i]]}: {path}" for i, side in enumerate(p["flipped"].values()) for path in side]
    out += [("paired comparison (same images)", paired), ("flipped images", flips or ["none"])]
    return out


def comparison_text(result: dict[str, Any]) -> str:
    parts = [f"== {title} ==\n" + (table(body) if isinstance(body[0], list) else "\n".join(body)) for title, body in _sections(result)]
    if "ranking" in result:
        parts.append(f"== ranking ==\n{ranking_text(result['ranking'])}")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}"
        "th{background:#f2f2f2}h2{margin-top:1.5em;font-size:1.1em}")


def comparison_html(result: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, no script, nothing fetched) of the same sections."""
    parts, sections = [], _sections(result)
    if "ranking" in result:
        sections.append((_ranking_title(result["ranking"]), _ranking_rows(result["ranking"])))
    for title, body in sections:
        if isinstance(body[0], list):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in body[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body[1:])
            content = f"<table><tr>{head}</tr>{rows}</table>"
        else:
            content = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in body) + "</ul>"
        parts.append(f"<section><h2>{html.escape(title)}</h2>{content}</section>")
    title = html.escape(" vs ".join(result["labels"]))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>compare {title}</title>'
            f"<style>{_CSS}</style></head><body><h1>compare {title}</h1>{''.join(parts)}</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.compare", description="Compare finished runs; the first is the baseline.")
    parser.add_argument("runs", nargs="+", help="run directories (<output.root>/<name>)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run directories")

    def go() -> int:
        result = compare([load_run(p) for p in args.runs])
        print(json.dumps(result, indent=2) if args.json else comparison_text(result), end="\n" if args.json else "")
        if args.html:
            try:
                Path(args.html).write_text(comparison_html(result), encoding="utf-8")
            except OSError as e:
                raise UserError(f"{args.html}: cannot write the page ({e.strerror})") from None
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
