import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this when a kernel module is first imported: set it before any test imports one (CPU has no GPU)
os.environ.setdefault("TRITON_INTERPRET", "1")
# Rewrites are not timed in tests: tiny models make most replacements slower than the original (min_speedup
# would leave them alone) and timing every site costs test time. Tests about timing turn it back on with
# `relinear.rewrite.timing.settings(measure=True, timer=<fake>, cache=None)`.
os.environ.setdefault("RELINEAR_TIMING", "off")

import pytest  # noqa: E402

from relinear.testing.profiles import load_profile  # noqa: E402

load_profile()  # HYPOTHESIS_PROFILE: ci (make test), nightly, or dev (default)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM (model, tokenizer), loaded offline once per test session."""
    from relinear.demo import load_minilm

    return load_minilm()
