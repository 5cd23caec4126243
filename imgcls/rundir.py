"""The run directory: when it may be (re)used, what each epoch saves in it, and how a run resumes.

<output.root>/<name>/ holds one run. A new run needs an absent or empty folder; `--resume`
continues the run a folder holds, and only with an experiment that differs from it in
result-neutral keys (config.RESULT_NEUTRAL). After every epoch `last.safetensors` holds the whole
loop state (weights, optimizer, scheduler, monitor, history, every RNG), so a resumed run has
exactly the bits the uninterrupted one would have had.
"""

from __future__ import annotations

import datetime
import json
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import imgcls
from imgcls import checkpoint, config, report, runtime, train
from imgcls.errors import CheckpointError, UserError

BEST, LAST = "best.safetensors", "last.safetensors"
# The one result file that differs between identical runs: wall-clock facts. Every other file a
# run writes is a function of (experiment, data, seed, machine) and byte-identical across runs.
TIMINGS = "timings.json"


def prepare(exp: config.Experiment, resume: bool) -> Path:
    """Check that the run directory may be (re)used; creates nothing (the first result file does).

    Leftover temp files of a killed save are deleted here, so they are never mistaken for results.
    """
    run_dir = Path(exp.output.root) / exp.name
    checkpoint.clean_temp_files(run_dir)
    finished = (run_dir / "metrics.json").exists()
    started = (run_dir / LAST).exists() or (run_dir / "config.toml").exists()
    if finished and not resume:
        raise UserError(
            f"{run_dir} already holds a finished run (metrics.json). To keep it, change `name` in the experiment; "
            f"to replace it, delete the folder first (rm -r {run_dir})"
        )
    if started and not resume:
        raise UserError(
            f"{run_dir} holds an unfinished run. Continue it with --resume, or delete the folder (rm -r {run_dir})"
        )
    if resume and (run_dir / "config.toml").exists():
        previous = config.load(run_dir / "config.toml")
        changed = refuse_changes(previous, exp, f"cannot resume {run_dir}: the experiment changed since the run started", "run")
        if changed:
            print(f"resuming with changed {', '.join(changed)} (does not change results)", file=sys.stderr)
    return run_dir


def refuse_changes(before: config.Experiment, now: config.Experiment, what: str, before_name: str) -> list[str]:
    """The result-neutral keys that changed; raises naming every other changed key."""
    changed = config.changed_keys(before, now)
    refused = [k for k in changed if k not in config.RESULT_NEUTRAL]
    if refused:
        raise UserError(
            f"{what}:\n" + config.describe_changes(before, now, refused, (before_name, "now"))
            + "\nRestore those values, or start a new run under another `name`"
        )
    return changed


@dataclass(frozen=True)
class ResumeRecord:
    """What a last checkpoint holds beyond the weights: the loop's state, the optimizer's and
    scheduler's state (a JSON skeleton whose tensors are the checkpoint's "optim.*"), and the
    scalar part of every RNG (their tensors are "rng.*")."""

    loop: train.LoopState
    optim_skeleton: Any
    rng_scalars: dict[str, Any]

    KEYS = ("loop", "resume", "rng")

    def to_meta(self) -> dict[str, Any]:
        return {"loop": self.loop.to_json(), "resume": self.optim_skeleton, "rng": self.rng_scalars}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], path: Path) -> ResumeRecord:
        if not set(cls.KEYS) <= meta.keys():
            raise CheckpointError(f"{path}: holds weights only, not the state needed to resume")
        return cls(train.LoopState.from_json(meta["loop"]), meta["resume"], meta["rng"])


@dataclass(frozen=True)
class RunDir:
    """One run's folder, with what every checkpoint in it records: the experiment and the classes."""

    path: Path
    exp: config.Experiment
    classes: list[str]

    def save(self, name: str, model: nn.Module, state: train.LoopState, opt: train.Optimization | None = None) -> None:
        """A weights-only checkpoint, or with `opt` the full state that --resume restores."""
        meta = {
            "classes": self.classes,
            "arch": self.exp.model.arch,
            "experiment": config.to_toml(self.exp),
            "epoch": state.epoch,
            "imgcls_version": imgcls.__version__,
        }
        optim_tensors, rng = {}, {}
        if opt is not None:
            optim_tensors, skeleton = checkpoint.flatten_state(
                {"optimizer": opt.optimizer.state_dict(), "scheduler": opt.schedule.scheduler.state_dict()}, "s"
            )
            rng, scalars = runtime.rng_state()
            meta |= ResumeRecord(state, skeleton, scalars).to_meta()
        checkpoint.save(self.path / name, checkpoint.Checkpoint(model.state_dict(), meta, optim_tensors, rng))

    def restore(self, model: nn.Module, opt: train.Optimization, device: torch.device) -> train.LoopState:
        """Put model, optimizer, scheduler, monitor and every RNG back as they were after the saved epoch."""
        path = self.path / LAST
        saved = checkpoint.load(path)
        record = ResumeRecord.from_meta(saved.meta, path)
        refuse_changes(saved.experiment(path), self.exp, f"{path} was saved by a different experiment", "checkpoint")
        model.load_state_dict(saved.model)
        states = checkpoint.unflatten_state(record.optim_skeleton, saved.optim)
        opt.optimizer.load_state_dict(states["optimizer"])
        opt.schedule.scheduler.load_state_dict(states["scheduler"])
        runtime.set_rng_state(saved.rng, record.rng_scalars, device)
        print(f"resuming {self.path} after epoch {record.loop.epoch}", file=sys.stderr)
        return record.loop


@dataclass
class Timings:
    """When and where a run ran, and how long each epoch took (timings.json)."""

    started: str
    host: str
    epoch_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, run_dir: Path) -> Timings:
        """Continue the timings a resumed run already has, or start new ones."""
        try:
            saved = json.loads((run_dir / TIMINGS).read_text())
            return cls(saved["started"], saved["host"], saved["epoch_seconds"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, or cut off by a kill: timings are not results
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            return cls(now, socket.gethostname())

    def record(self, run_dir: Path, epoch: int, seconds: float) -> None:
        self.epoch_seconds[str(epoch)] = round(seconds, 3)
        report.write_json(run_dir / TIMINGS, asdict(self) | {"train_seconds": round(sum(self.epoch_seconds.values()), 3)})
