"""Claim 17: the resolved experiment round-trips through its canonical TOML."""

from __future__ import annotations

import typing

import tomli_w
from hypothesis import Phase, find, given, settings

from imgcls import config as C

from .strategies import (
    AUGMENT_FIELDS,
    MODEL_FIELDS,
    OPTIMIZER_FIELDS,
    SCHEDULER_FIELDS,
    SECTION_FIELDS,
    TAGS,
    experiments,
)
from .support import falsify


def check_roundtrip(to_toml, user: dict) -> None:
    """TOML -> schema -> canonical TOML -> schema is the identity, and the canonical text is a fixed point."""
    resolved = C.loads(tomli_w.dumps(user))
    canonical = to_toml(resolved)
    again = C.loads(canonical)
    assert again == resolved, (canonical, resolved, again)
    assert to_toml(again) == canonical


@given(experiments())
def test_resolved_experiment_roundtrips(user):
    """The resolved experiment round-trips: TOML -> schema -> canonical TOML -> schema is the identity,
    for experiments generated over the whole schema (every variant, optional keys present or absent)."""
    check_roundtrip(C.to_toml, user)


def test_roundtrip_check_catches_lossy_dumps():
    """Broken variants: a dump that keeps 6 significant digits, and one that sorts the augment list."""

    def six_digits(exp):
        rounded = lambda v: float(f"{v:.6g}") if isinstance(v, float) else v
        return tomli_w.dumps(_walk(exp.model_dump(mode="json", exclude_none=True), rounded))

    def sorted_augment(exp):
        dumped = exp.model_dump(mode="json", exclude_none=True)
        dumped["augment"].sort(key=lambda op: op["op"])
        return tomli_w.dumps(dumped)

    falsify(lambda user: check_roundtrip(six_digits, user), experiments())
    falsify(lambda user: check_roundtrip(sorted_augment, user), experiments())


def _walk(value, leaf):
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, leaf) for v in value]
    return leaf(value)


REACH = settings(max_examples=500, database=None, phases=[Phase.generate])


def _members(union) -> list[type]:
    return list(typing.get_args(typing.get_args(union)[0]))


def test_strategies_cover_the_whole_schema():
    """The experiment strategy draws every variant of every union and every field of every section,
    so "generated over the whole schema" stays true when the schema grows."""
    for union, fields in (
        (C.Augment, AUGMENT_FIELDS),
        (C.Model, MODEL_FIELDS),
        (C.Optimizer, OPTIMIZER_FIELDS),
        (C.Scheduler, SCHEDULER_FIELDS),
    ):
        assert set(_members(union)) == set(fields)
    for cls, fields in {
        **AUGMENT_FIELDS,
        **MODEL_FIELDS,
        **OPTIMIZER_FIELDS,
        **SCHEDULER_FIELDS,
        **SECTION_FIELDS,
    }.items():
        assert set(cls.model_fields) - TAGS == set(fields), cls.__name__
    # DataConfig and Experiment are drawn key by key in experiments(): each key must be reachable.
    for key in C.DataConfig.model_fields:
        find(experiments(), lambda e, key=key: key in e["data"], settings=REACH)
    for key in C.Experiment.model_fields:
        find(experiments(), lambda e, key=key: key in e, settings=REACH)
    for cls in MODEL_FIELDS:  # every arch name, not only each variant
        for arch in typing.get_args(cls.model_fields["arch"].annotation):
            find(experiments(), lambda e, arch=arch: e["model"]["arch"] == arch, settings=REACH)
