"""Claim 12: every learning-rate schedule imgcls builds follows its closed form.

The schedules come from `train.build_scheduler` and are stepped the way `run.fit` steps them:
onecycle after every batch, the others after every epoch through `train.step_epoch_scheduler`
(plateau with the validation metric it watches). The references below are written from the
formulas in PyTorch's documentation, not from its code.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from imgcls import config as C
from imgcls import checkpoint, train
from imgcls.errors import ConfigError

from .strategies import monitored_value, number, section
from .support import falsify

# Magnitudes a real experiment uses; the schema's extremes (a gamma of 1e-320) only test float rounding.
SCHEDULES = {
    C.NoScheduler: {},
    C.StepLR: {"step_size": st.integers(1, 6), "gamma": number(0.01, 1)},
    C.CosineLR: {"eta_min": number(0, 1e-3)},
    C.PlateauLR: {
        "monitor": st.sampled_from(["val_loss", "val_acc"]),
        "factor": number(0.01, 0.99),
        "patience": st.integers(0, 4),
        "min_lr": number(0, 1e-2),
    },
    C.OneCycleLR: {"max_lr": number(1e-4, 10), "pct_start": number(0.01, 0.99)},
}


# Every scheduler but onecycle, which warms up by itself, takes a warm-up before it.
WARMED = (C.NoScheduler, C.StepLR, C.CosineLR, C.PlateauLR)


@st.composite
def cases(draw, kinds=tuple(SCHEDULES), warmup: bool = False) -> dict:
    """A schedule and a run to step it through; with `warmup`, a warm-up of 1 .. epochs - 1 epochs
    (the schema's bound) from a start factor a real experiment would use."""
    epochs = draw(st.integers(2 if warmup else 1, 12))
    kind = draw(st.sampled_from(kinds))
    table = draw(section(kind, SCHEDULES[kind]))
    if warmup:
        table |= {"warmup_epochs": draw(st.integers(1, epochs - 1)), "warmup_start_factor": draw(number(1e-6, 1))}
    return {
        "cfg": kind.model_validate(table),
        "lr": draw(number(1e-3, 1)),
        "epochs": epochs,
        "steps": draw(st.integers(1, 5)),
        "metrics": [{"val_loss": draw(monitored_value), "val_acc": draw(monitored_value)} for _ in range(epochs)],
    }


def observed_lrs(build, case: dict, resume_at: int | None = None) -> list[float]:
    """The learning rate of every optimizer step of a run, stepping the schedule as run.fit does;
    with resume_at, the optimizer and schedule are rebuilt before that epoch (from 0) and loaded
    with the states a checkpoint stores (flattened, the skeleton through JSON), as a resume does."""

    def fresh() -> tuple[torch.optim.Optimizer, train.Schedule]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=case["lr"])
        return optimizer, build(case["cfg"], optimizer, case["epochs"], case["steps"])

    optimizer, schedule = fresh()
    lrs = []
    for epoch in range(case["epochs"]):
        if epoch == resume_at:
            states = {"optimizer": optimizer.state_dict(), "scheduler": schedule.scheduler.state_dict()}
            tensors, skeleton = checkpoint.flatten_state(states, "s")
            states = checkpoint.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
            optimizer, schedule = fresh()
            optimizer.load_state_dict(states["optimizer"])
            schedule.scheduler.load_state_dict(states["scheduler"])
        for _ in range(case["steps"]):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if schedule.per_batch:
                schedule.scheduler.step()
        train.step_epoch_scheduler(schedule, case["metrics"][epoch])
    lrs.append(optimizer.param_groups[0]["lr"])  # after the last epoch: where the schedule ends
    return lrs


def cosine(start: float, end: float, pct: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def plateau_rule(cfg: C.PlateauLR, lr: float, metrics: list[dict]) -> list[float]:
    """ReduceLROnPlateau as documented: after more than `patience` epochs without a relative improvement
    of 1e-4 over the best value, multiply by factor (not below min_lr) and start counting again."""
    lrs, best, bad = [lr], None, 0
    for row in metrics:
        value = row[cfg.monitor]
        if cfg.monitor == "val_loss":
            better = value < (math.inf if best is None else best * (1 - 1e-4))
        else:
            better = value > (-math.inf if best is None else best * (1 + 1e-4))
        best, bad = (value, 0) if better else (best, bad + 1)
        if bad > cfg.patience:
            new = max(lr * cfg.factor, cfg.min_lr)
            lr = new if lr - new > 1e-8 else lr
            bad = 0
        lrs.append(lr)
    return lrs


def closed_form(case: dict) -> list[float]:
    """The learning rate of every optimizer step, and the value after the last epoch.

    A warm-up of W epochs from factor s gives epoch e (from 0) lr * (s + (1 - s) * e / W) for e < W;
    the schedule proper follows as if the run started at epoch W: its epoch e - W, over epochs - W
    epochs, watching the metrics of epochs W + 1 onwards (torch's SequentialLR(LinearLR, ...)).
    """
    cfg, lr, epochs, steps = case["cfg"], case["lr"], case["epochs"], case["steps"]
    warm = 0 if isinstance(cfg, C.OneCycleLR) else cfg.warmup_epochs
    per_epoch = [lr * (cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * e / warm) for e in range(warm)]
    rest = epochs - warm
    match cfg:
        case C.NoScheduler():
            per_epoch += [lr] * (rest + 1)
        case C.StepLR():
            per_epoch += [lr * cfg.gamma ** (e // cfg.step_size) for e in range(rest + 1)]
        case C.CosineLR():
            per_epoch += [cosine(lr, cfg.eta_min, e / rest) for e in range(rest + 1)]
        case C.PlateauLR():
            per_epoch += plateau_rule(cfg, lr, case["metrics"][warm:])
        case C.OneCycleLR():
            # Warm up from max_lr / 25 to max_lr over the first pct_start of the steps, then anneal to
            # max_lr / 25 / 1e4 at the last step; both halves are cosines.
            total, warm_end = epochs * steps, cfg.pct_start * epochs * steps - 1
            initial, final = cfg.max_lr / 25, cfg.max_lr / 25 / 1e4

            def at(t: int) -> float:
                if t <= warm_end:
                    return cosine(initial, cfg.max_lr, t / warm_end)
                return cosine(cfg.max_lr, final, (t - warm_end) / (total - 1 - warm_end))

            return [at(t) for t in range(total + 1)]
    return [lr_e for lr_e in per_epoch[:-1] for _ in range(steps)] + per_epoch[-1:]


def check_schedule(build, case: dict) -> None:
    got, want = observed_lrs(build, case), closed_form(case)
    assert len(got) == len(want)
    assert all(math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-15) for g, w in zip(got, want)), (got, want)


@given(cases())
@example(  # warm-up of exactly one step: pct_start * total - 1 == 0 must not divide by zero
    {
        "cfg": C.OneCycleLR(name="onecycle", max_lr=1.0, pct_start=0.25),
        "lr": 0.1,
        "epochs": 2,
        "steps": 2,
        "metrics": [{"val_loss": 1.0, "val_acc": 0.0}] * 2,
    }
)
def test_every_scheduler_matches_its_closed_form(case):
    """Every scheduler imgcls builds matches its closed form, at every optimizer step of a run: none (constant),
    step (lr * gamma ** (epoch // step_size)), cosine, plateau (its documented rule) and onecycle."""
    if isinstance(case["cfg"], C.OneCycleLR) and case["cfg"].pct_start * case["epochs"] * case["steps"] == 1:
        with pytest.raises(ConfigError, match="scheduler.pct_start"):
            observed_lrs(train.build_scheduler, case)
        return
    check_schedule(train.build_scheduler, case)


def test_schedule_check_catches_wrong_stepping_and_modes():
    """Broken variants: onecycle stepped per epoch, cosine over epochs + 1, plateau always minimising."""

    def per_epoch_onecycle(cfg, optimizer, epochs, steps):
        schedule = train.build_scheduler(cfg, optimizer, epochs * steps, 1)
        schedule.per_batch = False
        return schedule

    def long_cosine(cfg, optimizer, epochs, steps):
        return train.build_scheduler(cfg, optimizer, epochs + 1, steps)

    def minimising_plateau(cfg, optimizer, epochs, steps):
        schedule = train.build_scheduler(cfg.model_copy(update={"monitor": "val_loss"}), optimizer, epochs, steps)
        schedule.monitor = cfg.monitor  # watches the right metric, in the wrong direction for val_acc
        return schedule

    falsify(lambda c: check_schedule(per_epoch_onecycle, c), cases((C.OneCycleLR,)).filter(lambda c: c["steps"] > 1))
    falsify(lambda c: check_schedule(long_cosine, c), cases((C.CosineLR,)))
    falsify(lambda c: check_schedule(minimising_plateau, c), cases((C.PlateauLR,)))


@given(cases(WARMED, warmup=True))
@example(  # one warm-up epoch from lr / 10, then a cosine over the one epoch left: 0.01, 0.1, eta_min
    {
        "cfg": C.CosineLR(name="cosine", eta_min=0.0, warmup_epochs=1, warmup_start_factor=0.1),
        "lr": 0.1,
        "epochs": 2,
        "steps": 1,
        "metrics": [{"val_loss": 1.0, "val_acc": 0.0}] * 2,
    }
)
def test_warmup_then_each_scheduler_matches_the_closed_form(case):
    """A warm-up of W epochs rises linearly from warmup_start_factor * lr to lr: epoch e (from 0) uses
    lr * (s + (1 - s) * e / W); then none, step, cosine or plateau runs as if the run started at epoch W
    (step counts, cosine anneals over epochs - W, plateau watches only the epochs after the warm-up)."""
    check_schedule(train.build_scheduler, case)


def test_warmup_check_catches_other_ways_of_composing():
    """Broken variants: a cosine over the whole run, warm-up multiplied into a step schedule that counts
    from epoch 0 (timm's convention, not torch's SequentialLR), a plateau that also watches warm-up epochs,
    and a warm-up that ignores its start factor."""
    sched = torch.optim.lr_scheduler

    def whole_run_cosine(cfg, optimizer, epochs, steps):
        cosine_lr = sched.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.eta_min)
        warmup = sched.LinearLR(optimizer, cfg.warmup_start_factor, total_iters=cfg.warmup_epochs)
        return train.Schedule(sched.SequentialLR(optimizer, [warmup, cosine_lr], [cfg.warmup_epochs]), per_batch=False)

    def chained_step(cfg, optimizer, epochs, steps):
        warmup = sched.LinearLR(optimizer, cfg.warmup_start_factor, total_iters=cfg.warmup_epochs)
        step = sched.StepLR(optimizer, cfg.step_size, cfg.gamma)
        return train.Schedule(sched.ChainedScheduler([warmup, step]), per_batch=False)

    class EagerPlateau(train.WarmupPlateau):
        def step(self, metric):
            super().step(metric)
            if self.last_epoch <= self.epochs:
                self.plateau.step(metric)

    def eager_plateau(cfg, optimizer, epochs, steps):
        schedule = train.build_scheduler(cfg, optimizer, epochs, steps)
        inner = schedule.scheduler
        schedule.scheduler = EagerPlateau(inner.warmup, inner.plateau, inner.epochs)
        return schedule

    def from_zero(cfg, optimizer, epochs, steps):
        return train.build_scheduler(cfg.model_copy(update={"warmup_start_factor": 1e-6}), optimizer, epochs, steps)

    falsify(lambda c: check_schedule(whole_run_cosine, c), cases((C.CosineLR,), warmup=True))
    falsify(lambda c: check_schedule(chained_step, c), cases((C.StepLR,), warmup=True).filter(lambda c: c["cfg"].gamma < 1))
    falsify(lambda c: check_schedule(eager_plateau, c), cases((C.PlateauLR,), warmup=True))
    falsify(lambda c: check_schedule(from_zero, c), cases(WARMED, warmup=True))


def check_resume(build, case: dict, resume_at: int) -> None:
    assert observed_lrs(build, case, resume_at) == observed_lrs(build, case)


# A plateau that must decay right after its warm-up (the loss only worsens, patience 0), resumed inside the warm-up.
WORSENING_PLATEAU = {
    "cfg": C.PlateauLR(name="plateau", patience=0, factor=0.5, warmup_epochs=3, warmup_start_factor=0.25),
    "lr": 0.1,
    "epochs": 6,
    "steps": 1,
    "metrics": [{"val_loss": 1.0 + e / 8, "val_acc": 0.5} for e in range(6)],
}


@given(cases(warmup=False) | cases(WARMED, warmup=True), st.integers(0, 11))
@example(WORSENING_PLATEAU, 2)
def test_a_schedule_restored_from_a_checkpoint_continues_exactly(case, resume_at):
    """A schedule saved after any epoch and loaded into a freshly built one (as --resume does) gives
    the uninterrupted run's learning rates, bit for bit, warm-up or not."""
    if isinstance(case["cfg"], C.OneCycleLR) and case["cfg"].pct_start * case["epochs"] * case["steps"] == 1:
        return  # refused when built (see above)
    check_resume(train.build_scheduler, case, min(resume_at, case["epochs"] - 1))


def test_resume_check_catches_a_warmup_plateau_that_forgets_where_it_was():
    """Broken variants: a plateau warm-up whose saved state loses its epoch count, or its warm-up's."""

    def forgetting(key: str):
        class Forgetful(train.WarmupPlateau):
            def load_state_dict(self, state):
                fresh = train.WarmupPlateau.state_dict(self)  # as built: epoch 0, warm-up not begun
                super().load_state_dict(state | {key: fresh[key]})

        def build(cfg, optimizer, epochs, steps):
            schedule = train.build_scheduler(cfg, optimizer, epochs, steps)
            inner = schedule.scheduler
            schedule.scheduler = Forgetful(inner.warmup, inner.plateau, inner.epochs)
            return schedule

        return build

    resumes = st.tuples(cases((C.PlateauLR,), warmup=True), st.integers(0, 11))
    for key in ("last_epoch", "warmup"):
        falsify(lambda c: check_resume(forgetting(key), c[0], min(c[1], c[0]["epochs"] - 1)), resumes)


cosines = st.tuples(number(1e-4, 1), number(0, 1e-1), st.integers(1, 30))


def check_cosine_annealing(build, lr: float, eta_min: float, epochs: int) -> None:
    try:
        exp = C.validate(
            {
                "name": "c",
                "data": {"train_dir": "t", "val_dir": "v"},
                "model": {"arch": "scratch_cnn"},
                "optimizer": {"name": "sgd", "lr": lr},
                "scheduler": {"name": "cosine", "eta_min": eta_min},
                "train": {"epochs": epochs},
            }
        )
    except ConfigError as e:
        assert eta_min > lr and "scheduler.eta_min" in str(e), e
        return
    case = {"cfg": exp.scheduler, "lr": exp.optimizer.lr, "epochs": epochs, "steps": 1, "metrics": [{}] * epochs}
    lrs = observed_lrs(build, case)
    assert lrs[0] == lr
    assert math.isclose(lrs[epochs], eta_min, rel_tol=1e-12, abs_tol=1e-15)
    assert all(b <= a for a, b in itertools.pairwise(lrs)), lrs


@given(cosines)
@example((0.01, 0.05, 3))  # eta_min above lr: the schema refuses it, or cosine annealing would increase
def test_cosine_starts_at_lr_reaches_eta_min_never_increasing(args):
    """CosineAnnealingLR starts at lr and reaches eta_min at T_max (= train.epochs, after the last epoch),
    never increasing on the way."""
    check_cosine_annealing(train.build_scheduler, *args)


def test_cosine_check_catches_restarts_and_a_short_period():
    """Broken variants: T_max = epochs - 1 (the schedule climbs back up in the last epoch) and T_max = epochs + 1."""

    def period(delta):
        def build(cfg, optimizer, epochs, steps):
            return train.Schedule(
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, T_max=max(1, epochs + delta), eta_min=cfg.eta_min
                ),
                per_batch=False,
            )

        return build

    falsify(lambda args: check_cosine_annealing(period(-1), *args), cosines)
    falsify(lambda args: check_cosine_annealing(period(+1), *args), cosines)
