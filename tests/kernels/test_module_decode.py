"""`LinearizedAttention.step` decodes token by token what `forward(causal=True)` computes for the whole prefix,
for every variant (linear, window hybrid, Liger), with GQA and left padding."""

import pytest
import torch

from relinear.approx.linear_attention import LinearizedAttention

B, H, HK, T, D = 2, 4, 2, 9, 8
VARIANTS = {
    "elu": {"feature_map": "elu"},
    "hedgehog": {"feature_map": "hedgehog"},
    "hedgehog window 3": {"feature_map": "hedgehog", "window": 3},
    "hedgehog window 2 sinks 2": {"feature_map": "hedgehog", "window": 2, "sinks": 2},
    "liger window 3": {"gate": "liger", "window": 3},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_steps_reproduce_the_causal_forward(variant):
    gen = torch.Generator().manual_seed(0)
    module = LinearizedAttention(H, D, generator=gen, **VARIANTS[variant]).double()
    with torch.no_grad():
        for p in module.parameters():  # trained-looking values: a nonzero gate and magnitude
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HK, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    with torch.no_grad():
        want = module(q, k, v, key_mask=key_mask, causal=True, scale=0.4)
        cache, steps = None, []
        for t in range(T):
            out, cache = module.step(q[:, :, t], k[:, :, t], v[:, :, t], cache, key_mask[:, t], scale=0.4)
            steps.append(out)
    got = torch.stack(steps, dim=2)
    real = key_mask[:, None, :, None].expand_as(want)  # padded queries' outputs mean nothing
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)


def test_a_step_with_the_wrong_heads_names_the_shape():
    module = LinearizedAttention(H, D, feature_map="elu")
    with pytest.raises(ValueError, match=r"q_t must be \[B, 4, 8\]"):
        module.step(torch.randn(B, H + 1, D), torch.randn(B, HK, D), torch.randn(B, HK, D))
