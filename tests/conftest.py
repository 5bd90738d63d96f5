import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this when a kernel module is first imported: set it before any test imports one (CPU has no GPU)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from relinear.testing.profiles import load_profile  # noqa: E402

load_profile()  # HYPOTHESIS_PROFILE: ci (make test), nightly, or dev (default)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM (model, tokenizer), loaded offline once per test session."""
    from relinear.demo import load_minilm

    return load_minilm()
