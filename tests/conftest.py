import os

from hypothesis import HealthCheck, settings

# `ci`: derandomized and bounded so the suite stays well under 20 minutes on 2 cores; `nightly`: many more.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("nightly", deadline=None, max_examples=1000)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this when a kernel module is first imported: set it before any test imports one (CPU has no GPU)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM (model, tokenizer), loaded offline once per test session."""
    from relinear.demo import load_minilm

    return load_minilm()
