"""Hypothesis profiles shared by relinear's own suite and users' suites.

`ci` is derandomized (the same examples on every run, so a red build is reproducible) with no deadline
(CPU timings on shared runners vary) and few enough examples that the whole suite stays well under
20 minutes on 2 cores; `nightly` searches much harder; `dev` is quick for the edit-test loop.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = {
    "ci": dict(derandomize=True, deadline=None, max_examples=25, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "nightly": dict(deadline=None, max_examples=1000, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "dev": dict(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow]),
}
DEFAULT_PROFILE = "dev"
ENV_VAR = "HYPOTHESIS_PROFILE"


def register_profiles() -> None:
    for name, options in PROFILES.items():
        settings.register_profile(name, **options)


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load `name` (default: $HYPOTHESIS_PROFILE, else "dev"); returns the name."""
    register_profiles()
    name = name or os.environ.get(ENV_VAR) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"{ENV_VAR}={name!r} is not a relinear profile (known: {', '.join(PROFILES)})")
    settings.load_profile(name)
    return name
