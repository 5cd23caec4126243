"""Verify: re-run a run from its own config.toml and prove that it reproduces.

`python -m imgcls.verify RUN_DIR [--epochs K] [--anyway]`

First, before any training, the run's manifest.json is compared with the inputs as they are now:
data, starting weights, code and the environment that can change bits. Anything that changed is
named, and the re-run refused unless --anyway. Then the experiment runs again in a scratch folder
(under the system's temporary folder, removed afterwards) for K epochs (default: every epoch
history.csv records), and the two histories are compared epoch by epoch, every column, the
weights digest included. Exit 0: reproduced; 1: names the first epoch that differs and how;
2: a user error or changed inputs.

Relative paths in config.toml (data folders, a weights file) are read from the current folder, as
`imgcls.run` read them: verify assumes it is started in the folder the run was started in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgcls import checkpoint, config, data, run, rundir, runtime
from imgcls.errors import ConfigError, UserError, guarded

# CUDA runs are not promised bit-identical (a few backward kernels, adaptive pooling among them,
# have no deterministic version: runtime.seed_everything only warns there). A cuda run whose
# weights digests differ is still verified when every other history column agrees to this
# relative tolerance, and the verdict says which of the two it was.
GPU_REL_TOLERANCE = 1e-3
SHOWN_CHANGES = 50


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


# --------------------------------------------------------------------------- the recorded run


@dataclass(frozen=True)
class RecordedRun:
    """What a run directory says about the run: its experiment, history and manifest (None if absent)."""

    path: Path
    exp: config.Experiment
    history: list[dict[str, str]]
    manifest: dict[str, Any] | None


def read_run(run_dir: Path) -> RecordedRun:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; give the run directory (<output.root>/<name>/)")
    for name in ("config.toml", "history.csv"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a run directory with a finished epoch: it holds no {name}")
    # Paths are checked later, for the re-run: the run's own output.root may be read-only now.
    exp = config.load(run_dir / "config.toml")
    history = _read_history(run_dir / "history.csv")
    try:
        manifest = json.loads((run_dir / rundir.MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    except ValueError:
        raise UserError(f"{run_dir / rundir.MANIFEST}: damaged, not JSON; the run's inputs cannot be checked") from None
    return RecordedRun(run_dir, exp, history, manifest)


def _read_history(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error):
        raise UserError(f"{path}: damaged, not the CSV file a run writes") from None
    if "weights" not in (reader.fieldnames or []):
        raise UserError(f"{path} has no weights column (written by an imgcls that did not record the weights "
                        "after each epoch), so bit-identity cannot be checked")
    return rows


def _start_folder(run_dir: Path, exp: config.Experiment) -> Path | None:
    """The folder the run was started in, when a relative output.root tells it (runs/<name> -> ..)."""
    root = Path(exp.output.root)
    if root.is_absolute() or ".." in root.parts:
        return None
    folder = Path(os.path.abspath(run_dir))
    for part in reversed((root / exp.name).parts):
        if folder.name != part:
            return None  # the folder was moved or renamed: it no longer tells
        folder = folder.parent
    return folder


def check_paths(recorded: RecordedRun, exp: config.Experiment) -> None:
    """The re-run's folders and files exist, read from the current folder as the run read them."""
    problems = config.path_problems(exp.model_dump(mode="json"))
    if not problems:
        return
    start = _start_folder(recorded.path, recorded.exp)
    where = f" ({start}, by output.root and name)" if start and start != Path.cwd() else ""
    problems.append(f"verify reads relative paths from the current folder, as the run did: start it in the folder "
                    f"the run was started in{where}")
    raise ConfigError(str(recorded.path / "config.toml"), problems)


# ------------------------------------------------------------------------------------- inputs


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


def check_inputs(recorded: RecordedRun, exp: config.Experiment, anyway: bool) -> None:
    """Refuse (or with `anyway` only name) every input that changed since the run, before any training.

    Costs one preflight (every image decoded, as the run's own preflight did), which the re-run repeats.
    """
    # As run.setup does before it records its manifest: on a GPU seeding sets CUBLAS_WORKSPACE_CONFIG.
    runtime.seed_everything(exp.seed, runtime.resolve_device(exp.device, exp.train.precision))
    now = rundir.manifest(exp, data.prepare(exp.data, progress=False))
    manifest_path = recorded.path / rundir.MANIFEST
    try:
        changes = input_changes(recorded.manifest, now) if recorded.manifest else [f"{manifest_path}: absent, so no input can be checked"]
    except (KeyError, TypeError, AttributeError):  # hand-edited or from another program
        raise UserError(f"{manifest_path}: damaged, not a run manifest; the run's inputs cannot be checked") from None
    if not changes:
        return
    listing = "\n".join(f"  - {c}" for c in changes[:SHOWN_CHANGES])
    if len(changes) > SHOWN_CHANGES:
        listing += f"\n  ... and {len(changes) - SHOWN_CHANGES} more"
    if not anyway:
        raise UserError(f"cannot verify {recorded.path}: its inputs changed since the run:\n{listing}\n"
                        "Restore them, or re-run with --anyway to see where the results part")
    print(f"inputs changed since the run (re-running anyway):\n{listing}", file=sys.stderr)


# ------------------------------------------------------------------------------------- verify


def verify(run_dir: Path, epochs: int | None, anyway: bool, progress: bool) -> int:
    """Check the inputs, re-run `epochs` epochs in a scratch folder, compare the histories."""
    recorded = read_run(run_dir)
    recorded_epochs = len(recorded.history)
    k = recorded_epochs if epochs is None else epochs
    if recorded_epochs == 0:
        raise UserError(f"{run_dir / 'history.csv'} records no finished epoch: there is nothing to verify")
    if not 1 <= k <= recorded_epochs:
        raise UserError(f"--epochs {k}: {run_dir} recorded epochs 1 to {recorded_epochs}")
    cuda = recorded.exp.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError(f"{run_dir} trained on cuda, and this machine has no CUDA device: verify it on one that has")
    with tempfile.TemporaryDirectory(prefix="imgcls-verify-") as scratch:
        # output.root is result-neutral: it only says where the re-run's files land.
        exp = recorded.exp.model_copy(update={"output": recorded.exp.output.model_copy(update={"root": scratch})})
        check_paths(recorded, exp)
        check_inputs(recorded, exp, anyway)
        print(f"re-running {'epoch 1' if k == 1 else f'epochs 1 to {k}'} of {run_dir} in {scratch}", file=sys.stderr)
        run.run(exp, progress=progress, stop_after=k)
        rerun_dir = Path(scratch) / exp.name
        rerun = _read_history(rerun_dir / "history.csv")
        tensors = len(checkpoint.load(rerun_dir / rundir.LAST).model)
    return verdict(run_dir, recorded.history[:k], rerun, tensors, cuda)


def verdict(run_dir: Path, before: list[dict[str, str]], after: list[dict[str, str]], tensors: int, cuda: bool) -> int:
    """Print whether `after` reproduces `before`; the exit status (0 reproduced, 1 not)."""
    k = len(before)
    exact = compare_histories(before, after, None)
    if exact is None:
        print(f"bit-identical through epoch {k} ({tensors} tensors)")
        return 0
    if not cuda:
        print(f"{run_dir} does not reproduce: {exact}")
        return 1
    close = compare_histories(before, after, GPU_REL_TOLERANCE)
    why = "a cuda run is not promised bit-identical"
    if close:
        print(f"{run_dir} does not reproduce within a relative tolerance of {GPU_REL_TOLERANCE:g} ({why}): {close}")
        return 1
    print(f"reproduced within a relative tolerance of {GPU_REL_TOLERANCE:g} through epoch {k} (losses, accuracies, "
          f"learning rate), not bit-identical ({why}): the {tensors} tensors' digest first differs at epoch {exact.epoch}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.verify", description="Re-run a run and prove it reproduces.")
    parser.add_argument("run_dir", type=Path, help="the run directory (<output.root>/<name>/)")
    parser.add_argument("--epochs", type=int, help="verify only the first K epochs (default: every epoch history.csv records)")
    parser.add_argument("--anyway", action="store_true", help="re-run even though inputs changed, to see where results part")
    args = parser.parse_args(argv)
    return guarded(lambda: verify(args.run_dir, args.epochs, args.anyway, progress=sys.stderr.isatty()),
                   on_interrupt="the scratch folder is removed; the run directory is untouched")


if __name__ == "__main__":
    sys.exit(main())
