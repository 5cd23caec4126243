"""Hypothesis profiles for spec/ and tests/ alike.

HYPOTHESIS_PROFILE picks one: "dev" (default) explores new examples on every run and keeps
failures in .hypothesis/; "ci" is derandomized and keeps no database, so a CI failure reproduces
exactly; "fuzz" is for a long hunt on demand (`HYPOTHESIS_PROFILE=fuzz make test`). dev and ci run
few examples: every property is written to be meaningful at small sizes, so `make test` stays fast.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# too_slow: on a shared 2-core machine, drawing a whole experiment can take longer than hypothesis expects.
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True, scope="session")
def own_home(tmp_path_factory):
    """The tests' home folder is a new one, so the default data.cache_dir (~/.cache/imgcls) starts
    empty and no test reads or fills the user's cache. One for the session: a module's finished run
    and the test that reloads its experiment must expand `~` alike."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        yield
