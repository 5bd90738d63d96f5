"""Activation rules: fits against the exact functions, and the rule on graphs from both front ends."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import relinear as rl
from relinear.approx.activations import fit_polynomial, polynomial_activation


@pytest.mark.property
@given(lo=st.floats(-12, 0.5), width=st.floats(0.1, 20), activation=st.sampled_from(["gelu", "silu"]))
def test_polynomial_fit_is_close_everywhere_and_improves_with_degree(lo, width, activation):
    """Within the fitted range and far outside it (asymptotes), for any range the example may show."""
    hi = lo + width
    x = torch.linspace(-40, 40, 4001, dtype=torch.float64)
    exact = F.gelu(x) if activation == "gelu" else F.silu(x)
    err = lambda d: float((polynomial_activation(x, fit_polynomial(activation, lo, hi, d)) - exact).abs().max())
    span = max(hi, 10.0) - min(lo, -10.0)
    assert err(12) < err(4)
    assert err(12) <= 0.01 * span
    assert err(4) <= 0.05 * span


def test_polynomial_uses_asymptotes_outside_its_range():
    fit = fit_polynomial("silu", -4.0, 4.0, 6)
    x = torch.tensor([-50.0, 50.0])
    torch.testing.assert_close(polynomial_activation(x, fit), torch.tensor([0.0, 50.0]))


def test_fit_rejects_bad_ranges():
    with pytest.raises(ValueError, match="range"):
        fit_polynomial("gelu", 1.0, 1.0, 4)
    with pytest.raises(ValueError, match="relu6"):
        fit_polynomial("relu6", -1.0, 1.0, 4)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))) + F.silu(x)


@pytest.mark.parametrize("target,tol", [("tanh", 1e-3), ("poly", 2e-2), ("relu", 0.5)])
def test_activation_rule_reports_its_measured_error(target, tol):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 16)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.ActivationApprox(target=target)]), progress=False)
    expected = {"activation_approx": 1 if target == "tanh" else 2}
    assert report.counts == expected
    if target == "tanh":
        assert "silu" in report.skipped[0][2]
    for site in report.sites:
        assert 0 < site.error < tol
    out, ref = fast(x), model(x)
    assert float((out - ref).norm() / ref.norm()) < tol * 2


def test_activation_rule_fires_in_the_compile_backend():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(8, 16)
    torch._dynamo.reset()
    recipe = rl.Recipe([rl.ActivationApprox(target="tanh")])
    got = torch.compile(model, backend="relinear", options={"recipe": recipe})(x)
    assert rl.last_report().counts == {"activation_approx": 1}
    want = model.down(F.gelu(model.up(x), approximate="tanh")) + F.silu(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(got.sum()))
