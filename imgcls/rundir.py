"""The run directory: when it may be (re)used, what each epoch saves in it, and how a run resumes.

<output.root>/<name>/ holds one run. A new run needs an absent or empty folder; `--resume`
continues the run a folder holds, and only with an experiment that differs from it in
result-neutral keys (config.RESULT_NEUTRAL). After every epoch `last.safetensors` holds the whole
loop state (weights, optimizer, scheduler, monitor, history, every RNG), so a resumed run has
exactly the bits the uninterrupted one would have had.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

import imgcls
from imgcls import checkpoint, config, data, distributed, models, provenance, report, runtime, train
from imgcls.errors import CheckpointError, UserError

BEST, LAST = "best.safetensors", "last.safetensors"
# The one result file that differs between identical runs: wall-clock facts. Every other file a
# run writes is a function of (experiment, data, seed, machine) and byte-identical across runs.
TIMINGS = "timings.json"
MANIFEST = "manifest.json"
LOCK = ".lock"


@contextlib.contextmanager
def claim(exp: config.Experiment, resume: bool) -> Iterator[Path]:
    """The run directory, locked for this process's life, once its reuse rules allow it.

    One folder, one writer: a second run of the same name, or a --resume while the run is still
    going, is refused naming the first. The OS drops the lock when the process dies, so a kill -9
    never leaves a stale lock (see `lock`).
    """
    run_dir = Path(exp.output.root) / exp.name
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise UserError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None
    try:
        try:
            lock(fd)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{run_dir}: cannot lock the run folder ({e.strerror})") from None
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}; wait for it to end, or give this run another `name`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _check_reuse(run_dir, exp, resume)
        yield run_dir
    finally:
        if created and os.listdir(run_dir) == [LOCK]:  # stopped before writing anything: leave no trace
            (run_dir / LOCK).unlink()
            for folder in created:
                folder.rmdir()
        os.close(fd)  # releases the lock; the file stays, harmless, for the next run to lock


def lock(fd: int) -> None:
    """Lock the open file exclusively for this process, or raise OSError (EACCES/EAGAIN) if another
    holds it. A POSIX record lock, not an flock: an flock is shared with every forked child, so a
    killed run's loader or decode workers, alive for seconds after it, kept its folder locked and
    refused the --resume; a record lock belongs to this process alone and dies with it. (Closing
    any descriptor of the file in this process would drop it too: only `claim` opens it.)"""
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _check_reuse(run_dir: Path, exp: config.Experiment, resume: bool) -> None:
    """Refuse to overwrite a run, and refuse a resume that could not continue it exactly.

    Leftover temp files of a killed save are deleted here, so they are never mistaken for results.
    """
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
    if resume and not finished and not (run_dir / LAST).exists():
        _refuse_lost_progress(run_dir)
    if resume and (run_dir / "config.toml").exists():
        previous = config.load(run_dir / "config.toml")
        changed = refuse_changes(previous, exp, f"cannot resume {run_dir}: the experiment changed since the run started", "run")
        if changed:
            print(f"resuming with changed {', '.join(changed)} (does not change results)", file=sys.stderr)


def _refuse_lost_progress(run_dir: Path) -> None:
    """Without last.safetensors a resume starts at epoch 1, which is right only if no epoch finished.

    A kill between epoch 1's best and last checkpoints leaves best.safetensors of epoch 1 alone;
    anything more (a history, a later best) means last.safetensors was lost, and starting over
    would overwrite the run's progress.
    """
    progress = [name for name in ("history.csv",) if (run_dir / name).exists()]
    if (run_dir / BEST).exists() and checkpoint.load(run_dir / BEST).meta.get("epoch", 0) > 1:
        progress.append(BEST)
    if progress:
        raise UserError(
            f"cannot resume {run_dir}: it holds {' and '.join(progress)} but no {LAST}, so the run cannot continue "
            f"where it stopped (starting again would overwrite them). Keep the folder as it is and start a new "
            f"run under another `name`, or delete it (rm -r {run_dir})"
        )


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


# ------------------------------------------------------------------------------------ manifest


def manifest(exp: config.Experiment, dataset: data.Data, world: distributed.World = distributed.World()) -> dict[str, Any]:
    """Everything a run depends on besides its experiment: every file of every split (path under
    the split's folder, class, size, SHA-256), the starting weights, the code and the environment
    facts that can change bits. Digests name each split and the data as a whole.

    A run of several processes records their number and backend ("distributed"): the gradient
    all-reduce sums in another order, so bits change with them. One process records none."""
    splits = {name: _split_manifest(split, dataset.classes) for name, split in dataset.splits.items()}
    environment = provenance.bit_relevant_environment()
    if world.distributed:
        environment["distributed"] = {"world_size": world.size, "backend": world.backend}
    return {
        "data": {"digest": _digest(f"{name}\t{s['digest']}" for name, s in splits.items()), "splits": splits},
        "weights": models.weights_identity(exp.model),
        "code": provenance.code_identity(),
        "environment": dict(sorted(environment.items())),
    }


def _split_manifest(split: data.Split, classes: list[str]) -> dict[str, Any]:
    files = sorted(
        ({"path": p, "class": classes[y], "size": n, "sha256": h}
         for p, y, n, h in zip(split.relative_paths(), split.labels, split.sizes, split.sha256)),
        key=lambda f: f["path"],
    )
    # The folder a split lives in is not part of its digest: moving the data changes no result.
    digest = _digest(f"{f['path']}\t{f['class']}\t{f['sha256']}" for f in files)
    return {"root": split.root, "digest": digest, "images": len(files), "files": files}


def _digest(lines: Any) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class FileChange:
    """One file of a split that differs between two manifests, by its path under the split's folder."""

    path: str
    kind: Literal["added", "removed", "changed"]  # changed: same path, other content or class
    classes: tuple[str | None, str | None]  # before, now; None where the file is absent

    def __str__(self) -> str:
        before, now = self.classes
        relabelled = self.kind == "changed" and before != now
        return f"{self.kind} {self.path}" + (f" (class {before} -> {now})" if relabelled else "")


def split_changes(before: dict[str, Any], now: dict[str, Any]) -> dict[str, list[FileChange]]:
    """Per split of either manifest, its files added, removed and changed (content or class)."""
    out = {}
    for name in dict.fromkeys([*before["data"]["splits"], *now["data"]["splits"]]):
        a = {f["path"]: f for f in before["data"]["splits"].get(name, {}).get("files", [])}
        b = {f["path"]: f for f in now["data"]["splits"].get(name, {}).get("files", [])}
        out[name] = (
            [FileChange(p, "added", (None, b[p]["class"])) for p in b if p not in a]
            + [FileChange(p, "removed", (a[p]["class"], None)) for p in a if p not in b]
            + [FileChange(p, "changed", (a[p]["class"], b[p]["class"])) for p in a if p in b and a[p] != b[p]]
        )
    return out


def data_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Per split, the files added, removed and changed between two manifests, one line each."""
    return [f"{name}: {change}" for name, changes in split_changes(before, now).items() for change in changes]


def refuse_other_inputs(run_dir: Path, now: dict[str, Any]) -> None:
    """A resume must see the data and starting weights the run started with; code and environment
    changes are allowed but named, since they can change bits."""
    try:
        before = json.loads((run_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return  # killed before the manifest was written: nothing has trained yet
    except ValueError:
        raise UserError(f"{run_dir / MANIFEST}: damaged; delete the run folder and start again") from None
    problems = data_changes(before, now)
    if before["weights"] != now["weights"]:
        problems.append(f"model.weights: {before['weights']} (run) vs {now['weights']} (now)")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise UserError(
            f"cannot resume {run_dir}: its inputs changed since the run started:\n{shown}\n"
            "Restore them, or start a new run under another `name`"
        )
    for part in ("code", "environment"):
        if before[part] != now[part]:
            keys = sorted(k for k in {*before[part], *now[part]} if before[part].get(k) != now[part].get(k))
            print(f"resuming with a changed {part} ({', '.join(keys)}): later epochs may differ in bits", file=sys.stderr)


# ----------------------------------------------------------------------------------- checkpoints


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
    world: distributed.World = distributed.World()  # only its main rank writes; every rank's RNG is saved

    def save(
        self, name: str, model: nn.Module, state: train.LoopState, opt: train.Optimization | None = None,
        average: train.Ema | None = None,
    ) -> None:
        """A weights-only checkpoint, or with `opt` the full state that --resume restores; either holds
        `average`, the weights' moving average, beside the weights when the run keeps one."""
        meta = {
            "classes": self.classes,
            "arch": self.exp.model.arch,
            "experiment": config.to_toml(self.exp),
            "epoch": state.epoch,
            "imgcls_version": imgcls.__version__,
        }
        optim_tensors, rng = {}, {}
        if opt is not None:
            optim_tensors, skeleton = checkpoint.flatten_state(opt.resumable_state(), "s")
            rng, scalars = _every_rank_rng(self.world)
            meta |= ResumeRecord(state, skeleton, scalars).to_meta()
        ema = {} if average is None else average.model.state_dict()
        if self.world.is_main:
            saved = checkpoint.Checkpoint(model.state_dict(), meta, optim_tensors, rng, ema)
            checkpoint.save(self.path / name, saved)

    def restore(self, model: nn.Module, opt: train.Optimization, device: torch.device) -> train.LoopState:
        """Put model, optimizer, scheduler, monitor and every RNG back as they were after the saved epoch."""
        path = self.path / LAST
        saved = checkpoint.load(path)
        record = ResumeRecord.from_meta(saved.meta, path)
        refuse_changes(saved.experiment(path), self.exp, f"{path} was saved by a different experiment", "checkpoint")
        if saved.classes != self.classes:
            raise CheckpointError(
                f"{path} was trained on classes {saved.classes}, but the data now has {self.classes}; "
                "a class folder was added, removed or renamed since the run started"
            )
        model.load_state_dict(saved.model)
        if opt.ema is not None:
            if not saved.ema:
                raise CheckpointError(f"{path} holds no weight average, but train.ema_decay asks for one")
            opt.ema.model.load_state_dict(saved.ema)
        opt.load_resumable_state(checkpoint.unflatten_state(record.optim_skeleton, saved.optim))
        _restore_rank_rng(saved.rng, record.rng_scalars, self.world, device)
        if self.world.is_main:
            print(f"resuming {self.path} after epoch {record.loop.epoch}", file=sys.stderr)
        return record.loop


def _every_rank_rng(world: distributed.World) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """runtime.rng_state() of one process as it is; of several, every rank's under "rank<r>." and
    {"ranks": [scalars of rank 0, 1, ...]}: each rank draws its own dropout masks."""
    if not world.distributed:
        return runtime.rng_state()
    tensors, scalars = {}, []
    for r, (rank_tensors, rank_scalars) in enumerate(world.gather(runtime.rng_state())):
        tensors |= {f"rank{r}.{k}": v for k, v in rank_tensors.items()}
        scalars.append(rank_scalars)
    return tensors, {"ranks": scalars}


def _restore_rank_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], world: distributed.World,
                      device: torch.device) -> None:
    """This rank's generators as saved. A rank the run did not have before (more processes than when it
    was saved; the manifest names the change) keeps its fresh seeding."""
    ranks = scalars["ranks"] if "ranks" in scalars else [scalars]
    if world.rank >= len(ranks):
        return
    prefix = f"rank{world.rank}." if "ranks" in scalars else ""
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    runtime.set_rng_state(mine, ranks[world.rank], device)


@dataclass
class Timings:
    """When, where and how long a run ran (timings.json): what differs between identical runs."""

    machine: dict[str, Any]  # provenance.volatile_environment() at the run's first start
    epoch_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, run_dir: Path) -> Timings:
        """Continue the timings a resumed run already has, or start new ones."""
        try:
            saved = json.loads((run_dir / TIMINGS).read_text())
            return cls(saved["machine"], saved["epoch_seconds"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, or cut off by a kill: timings are not results
            return cls(provenance.volatile_environment())

    def record(self, run_dir: Path, epoch: int, seconds: float) -> None:
        self.epoch_seconds[str(epoch)] = round(seconds, 3)
        report.write_json(run_dir / TIMINGS, asdict(self) | {"train_seconds": round(sum(self.epoch_seconds.values()), 3)})
