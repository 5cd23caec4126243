"""Claim 13: early stopping stops exactly when `patience` epochs pass without an improvement larger than
`min_delta`, and the best checkpoint is the argmin/argmax epoch.

`train.Monitor` is checked against two references written from the claim, not from its code: a
counter simulation, and the claim's own wording (the first epoch whose last `patience` epochs hold no
improvement). An end-to-end run with scripted validation values then checks that `run.fit` stops where
the Monitor says and saves the best checkpoint at the argmin/argmax epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imgcls import checkpoint, evaluate, run, train
from imgcls.errors import UserError

from .strategies import min_deltas, monitored_values
from .support import falsify, tiny_experiment


def improves(value: float, reference: float | None, mode: str, min_delta: float) -> bool:
    """An improvement larger than min_delta over `reference`; NaN never improves; the first number always does."""
    if math.isnan(value):
        return False
    if reference is None:
        return True
    return reference - value > min_delta if mode == "min" else value - reference > min_delta


def improvement_epochs(values: list[float], mode: str, min_delta: float) -> list[bool]:
    """Whether each epoch improves on the value of the last improving epoch before it."""
    flags, reference = [], None
    for value in values:
        flags.append(improves(value, reference, mode, min_delta))
        reference = value if flags[-1] else reference
    return flags


def stop_by_counting(values, mode, patience, min_delta) -> int | None:
    """Reference 1: count epochs since the last improvement; stop when the count reaches patience."""
    since = 0
    for epoch, improved in enumerate(improvement_epochs(values, mode, min_delta), start=1):
        since = 0 if improved else since + 1
        if since >= patience:
            return epoch
    return None


def stop_by_wording(values, mode, patience, min_delta) -> int | None:
    """Reference 2, the claim's words: the first epoch e at which the `patience` epochs e - patience + 1 .. e
    have passed without an improvement larger than min_delta."""
    flags = improvement_epochs(values, mode, min_delta)
    return next((e for e in range(patience, len(values) + 1) if not any(flags[e - patience : e])), None)


def best_epoch(values: list[float], mode: str) -> int:
    """First argmin (min) or argmax (max) among the finite values, 1-based; 0 when none is finite."""
    finite = [(v if mode == "min" else -v, e) for e, v in enumerate(values, start=1) if not math.isnan(v)]
    return min(finite)[1] if finite else 0


def check_monitor(make_monitor, case) -> None:
    values, mode, patience, min_delta = case
    monitor = make_monitor(mode, patience, min_delta)
    stopped_at, new_bests = None, []
    for epoch, value in enumerate(values, start=1):
        is_best, stop = monitor.update(epoch, value)
        new_bests += [epoch] if is_best else []
        if stop:
            stopped_at = epoch
            break
    expected = stop_by_counting(values, mode, patience, min_delta)
    assert expected == stop_by_wording(values, mode, patience, min_delta)  # the two readings of the claim agree
    assert stopped_at == expected, (stopped_at, expected)
    seen = values[: stopped_at or len(values)]
    assert monitor.best_epoch == best_epoch(seen, mode)
    assert (new_bests[-1] if new_bests else 0) == best_epoch(seen, mode)  # the last best checkpoint saved


cases = st.tuples(monitored_values, st.sampled_from(["min", "max"]), st.integers(1, 5), min_deltas)


@given(cases)
@example(([1.0, 0.5, 0.75, 0.5, 0.25], "min", 2, 0.25))  # 0.75 and the tie 0.5 are no improvement: stop at 4
@example(([0.5, 0.4375, 0.375, 0.3125], "min", 3, 0.125))  # slow creep: 0.3125 beats the reference 0.5 by 0.1875
@example(([math.nan, math.nan, 1.0], "max", 2, 0.0))  # NaN epochs count as epochs without improvement
def test_early_stopping_stops_at_first_epoch_after_patience_without_improvement(case):
    """Early stopping: for any sequence of monitored values, imgcls stops exactly at the first epoch where
    `patience` epochs have passed without an improvement larger than `min_delta`, and the best checkpoint is
    the argmin/argmax epoch (the first one on ties; a NaN is never best)."""
    check_monitor(train.Monitor, case)


@given(monitored_values, st.sampled_from(["min", "max"]))
def test_monitor_without_patience_never_stops(values, mode):
    """With no [early_stopping] section, every epoch runs and the best epoch is still the argmin/argmax."""
    monitor = train.Monitor(mode)
    assert not any(monitor.update(e, v)[1] for e, v in enumerate(values, start=1))
    assert monitor.best_epoch == best_epoch(values, mode)


def test_monitor_check_catches_common_early_stopping_bugs():
    """Broken variants: patience compared with >, improvement measured against the running best instead of the
    last improvement, the last tie taken as best, and NaN treated as an improvement."""

    class OffByOne(train.Monitor):
        def update(self, epoch, value):
            is_best, _ = super().update(epoch, value)
            return is_best, self.patience is not None and self.bad_epochs > self.patience

    class RunningBest(train.Monitor):
        def update(self, epoch, value):
            is_best, stop = super().update(epoch, value)
            self.reference = self.best  # small improvements move the bar: a slow creep never stops
            return is_best, stop

    class LastTie(train.Monitor):
        def _better(self, value, than, delta):
            return super()._better(value, than, delta) or (delta == 0 and value == than)

    class NanImproves(train.Monitor):
        def _better(self, value, than, delta):
            return math.isnan(value) or super()._better(value, than, delta)

    for broken in (OffByOne, RunningBest, LastTie, NanImproves):
        falsify(lambda case, broken=broken: check_monitor(broken, case), cases)


# ------------------------------------------------------------------------------------- end to end


def scripted_validation(monkeypatch, values: list[float]) -> None:
    """Make epoch i's validation loss and accuracy both equal values[i]; everything else is really computed."""
    real, script = evaluate.compute_metrics, iter(values)

    def compute_metrics(logits, labels, classes):
        metrics = real(logits, labels, classes)
        value = next(script, None)
        return metrics if value is None else metrics | {"loss": value, "accuracy": value}

    monkeypatch.setattr(evaluate, "compute_metrics", compute_metrics)


runs = st.tuples(
    st.lists(st.integers(0, 8).map(lambda i: i / 8), min_size=1, max_size=5),
    st.sampled_from(["val_loss", "val_acc"]),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.125]),
)


@pytest.mark.slow
@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs)
@example(([0.5, 0.25, 0.375, 0.375, 0.5], "val_loss", 2, 0.0))
def test_run_stops_early_and_keeps_the_best_checkpoint(tiny_data, tmp_path_factory, no_plots, monkeypatch, case):
    """In a real run, training stops after the epoch the Monitor names, and best.safetensors holds the
    argmin (val_loss) / argmax (val_acc) epoch."""
    values, select, patience, min_delta = case
    mode = "min" if select == "val_loss" else "max"
    with monkeypatch.context() as m:
        scripted_validation(m, values)
        exp = tiny_experiment(
            tiny_data,
            tmp_path_factory.mktemp("runs"),
            "stop",
            train={"epochs": len(values), "select_best": select},
            early_stopping={"monitor": select, "patience": patience, "min_delta": min_delta},
            augment=[],
        )
        results = run.run(exp, progress=False)
    stop = stop_by_counting(values, mode, patience, min_delta)
    assert results["epochs_run"] == (stop or len(values))
    assert results["stopped_early"] == (stop is not None and stop < len(values))
    assert results["best_epoch"] == best_epoch(values[: results["epochs_run"]], mode)
    best = checkpoint.load(Path(exp.output.root) / "stop" / "best.safetensors")
    assert best.meta["epoch"] == results["best_epoch"]


def test_run_refuses_to_pick_a_best_epoch_from_nan_only(tiny_data, tmp_path, no_plots, monkeypatch):
    """When every monitored value is NaN there is no best epoch, and the run says so instead of picking one."""
    scripted_validation(monkeypatch, [math.nan, math.nan])
    exp = tiny_experiment(tiny_data, tmp_path, "nan", augment=[])
    with pytest.raises(UserError, match="no epoch gave a finite val_loss"):
        run.run(exp, progress=False)
