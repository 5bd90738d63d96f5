import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this when a kernel module is first imported: set it before any test imports one (CPU has no GPU)
os.environ.setdefault("TRITON_INTERPRET", "1")
# Rewrites are not timed in tests: tiny models make most replacements slower than the original (min_speedup
# would leave them alone) and timing every site costs test time. Tests about timing turn it back on with
# `relinear.rewrite.timing.settings(measure=True, timer=<fake>, cache=None)`.
os.environ.setdefault("RELINEAR_TIMING", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

from relinear.testing.profiles import load_profile  # noqa: E402

load_profile()  # HYPOTHESIS_PROFILE: ci (make test), nightly, or dev (default)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM (model, tokenizer), loaded offline once per test session."""
    from relinear.demo import load_minilm

    return load_minilm()


@pytest.fixture
def two_threads():
    """Two CPU threads, whatever the suite runs with (make test sets one): Inductor generates other CPU code for
    more than one thread (tests/test_backend_dynamic.py, tests/kernels/test_linear_attention_op.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo():
    """Dynamo forgets compiled code before and after the test: every op's call shares one code object, whose
    compilations count against Dynamo's recompile limit across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
