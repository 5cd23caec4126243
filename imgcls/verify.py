"""Verify: re-run a run from its own config.toml and prove that it reproduces.

`python -m imgcls.verify RUN_DIR [--epochs K] [--anyway]`

First, before any training, the run's manifest.json is compared with the inputs as they are now:
data, starting weights, code and the environment that can change bits. Anything that changed is
named, and the re-run refused unless --anyway. Then the experiment runs again in a scratch folder
for K epochs (default: all the run ran) and history.csv is compared epoch by epoch, every column,
the weights digest included. Exit 0: reproduced; 1: names the first epoch that differs and how;
2: a user error or changed inputs. Relative paths in config.toml start at the current folder, as
they did for `imgcls.run`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls import checkpoint, config, data, rundir, run, runtime
from imgcls.errors import UserError, guarded

# On a GPU bit-identity is not promised (a few CUDA kernels have no deterministic version), so
# there every column but the weights digest is compared to this relative tolerance instead.
GPU_REL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Divergence:
    """The first epoch whose history row differs, and each differing column with both values."""

    epoch: int
    columns: list[tuple[str, str, str]]  # (column, the run's value, the re-run's value)

    def __str__(self) -> str:
        shown = "\n".join(f"  - {c}: {a} (run) vs {b} (re-run)" for c, a, b in self.columns)
        return f"epoch {self.epoch} differs:\n{shown}"


def compare_histories(before: list[dict[str, str]], after: list[dict[str, str]], rel_tolerance: float | None) -> Divergence | None:
    """The first row of `before` that `after` does not reproduce; None when all match.

    rel_tolerance None: every column must be the same string (floats are written as repr, so equal
    strings are equal bits). A number: `weights` is skipped and the rest compared to that tolerance.
    """
    for i, a in enumerate(before):
        epoch = i + 1
        if i >= len(after):
            return Divergence(epoch, [("epoch", a.get("epoch", str(epoch)), "absent (the re-run stopped before it)")])
        b = after[i]
        columns = [c for c in dict.fromkeys([*a, *b]) if rel_tolerance is None or c != "weights"]
        differing = [(c, a.get(c, "absent"), b.get(c, "absent")) for c in columns if not _same(a.get(c), b.get(c), rel_tolerance)]
        if differing:
            return Divergence(epoch, differing)
    return None


def _same(a: str | None, b: str | None, rel_tolerance: float | None) -> bool:
    if a == b or rel_tolerance is None or a is None or b is None:
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tolerance)
    except ValueError:  # not a number: only equal strings match
        return False


def input_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per difference between the run's manifest and today's: data files, then the
    starting weights, the code and the bit-relevant environment key by key, with both values."""
    lines = [f"data: {line}" for line in rundir.data_changes(before, now)]
    for part in ("weights", "code", "environment"):
        for key in config.differing_keys(before.get(part), now[part], f"{part}."):
            lines.append(f"{key}: {_at(before, key)} (run) vs {_at(now, key)} (now)")
    return lines


def _at(tree: Any, key: str) -> str:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return "absent" if tree is None else json.dumps(tree)


def _read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_run(run_dir: Path) -> tuple[config.Experiment, list[dict[str, str]], dict[str, Any] | None]:
    """The run's experiment, history rows and manifest (None for a run that has none)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; give the run directory (<output.root>/<name>/)")
    for name in ("config.toml", "history.csv"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a run directory with a finished epoch: it holds no {name}")
    exp = config.load(run_dir / "config.toml", check_paths=True)
    try:
        manifest = json.loads((run_dir / rundir.MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except ValueError:
        raise UserError(f"{run_dir / rundir.MANIFEST}: damaged, not JSON; the run's inputs cannot be checked") from None
    return exp, _read_history(run_dir / "history.csv"), manifest


def check_inputs(run_dir: Path, exp: config.Experiment, before: dict[str, Any] | None, anyway: bool) -> None:
    """Refuse (or with `anyway` only name) every input that changed since the run, before any training."""
    # As run.setup does before it records its manifest: on a GPU seeding sets CUBLAS_WORKSPACE_CONFIG.
    runtime.seed_everything(exp.seed, runtime.resolve_device(exp.device))
    now = rundir.manifest(exp, data.prepare(exp.data, progress=False))  # decodes every image once
    try:
        changes = input_changes(before, now) if before else [f"{rundir.MANIFEST}: absent, so no input can be checked"]
    except (KeyError, TypeError, AttributeError):  # hand-edited or from another program
        raise UserError(f"{run_dir / rundir.MANIFEST}: damaged, not a run manifest; the run's inputs cannot be checked") from None
    if not changes:
        return
    listing = "\n".join(f"  - {c}" for c in changes)
    if not anyway:
        raise UserError(f"cannot verify {run_dir}: its inputs changed since the run:\n{listing}\n"
                        "Restore them, or re-run with --anyway to see where the results part")
    print(f"inputs changed since the run (re-running anyway):\n{listing}", file=sys.stderr)


def verify(run_dir: Path, epochs: int | None, anyway: bool, progress: bool) -> int:
    """Check the inputs, re-run `epochs` epochs in a scratch folder, compare the histories."""
    exp, history, manifest = _read_run(run_dir)
    metrics = run_dir / "metrics.json"
    ran = json.loads(metrics.read_text())["epochs_run"] if metrics.exists() else len(history)
    k = ran if epochs is None else epochs
    if not 1 <= k <= min(ran, len(history)):
        raise UserError(f"--epochs {k}: {run_dir} recorded epochs 1 to {min(ran, len(history))}")
    check_inputs(run_dir, exp, manifest, anyway)
    tolerance = GPU_REL_TOLERANCE if exp.device == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="imgcls-verify-") as scratch:
        output = exp.output.model_copy(update={"root": scratch})  # result-neutral: only where files land
        run.run(exp.model_copy(update={"output": output}), progress=progress, stop_after=k)
        rerun = _read_history(Path(scratch) / exp.name / "history.csv")
    divergence = compare_histories(history[:k], rerun, tolerance)
    if divergence:
        print(f"{run_dir} does not reproduce: {divergence}")
        return 1
    saved = run_dir / (rundir.LAST if (run_dir / rundir.LAST).exists() else rundir.BEST)
    print(reproduced_line(k, len(checkpoint.load(saved).model), tolerance))
    return 0


def reproduced_line(epochs: int, tensors: int, rel_tolerance: float | None) -> str:
    if rel_tolerance is None:
        return f"bit-identical through epoch {epochs} ({tensors} tensors)"
    return (f"reproduced within rel {rel_tolerance:g} through epoch {epochs} (losses, accuracies, lr): a cuda run "
            f"is not promised bit-identical, so the weights digest of its {tensors} tensors was not compared")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.verify", description="Re-run a run and prove it reproduces.")
    parser.add_argument("run_dir", type=Path, help="the run directory (<output.root>/<name>/)")
    parser.add_argument("--epochs", type=int, help="verify only the first K epochs (default: every epoch the run ran)")
    parser.add_argument("--anyway", action="store_true", help="re-run even though inputs changed, to see where results part")
    args = parser.parse_args(argv)
    return guarded(lambda: verify(args.run_dir, args.epochs, args.anyway, progress=sys.stderr.isatty()),
                   on_interrupt="the scratch folder is removed; the run directory is untouched")


if __name__ == "__main__":
    sys.exit(main())
