"""`FeatureMap.of_scaled(x, s)` is phi(x * s) for every map, with or without autograd, and leaves x alone
(the fast paths work in place on their own scaled copy)."""

import pytest
import torch

from relinear.approx.feature_maps import FEATURE_MAPS, make_feature_map


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("grad", [False, True])
def test_of_scaled_is_the_map_of_the_scaled_input(name, grad):
    phi = make_feature_map(name, 2, 8, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    before = x.clone()
    scale = 0.7
    x_fast, x_ref = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        fast, ref = phi.of_scaled(x_fast, scale), phi(x_ref * scale)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    if grad:
        weights = torch.randn_like(ref)
        (g_fast,) = torch.autograd.grad((fast * weights).sum(), x_fast)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), x_ref)
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(x_fast, before, rtol=0, atol=0)
