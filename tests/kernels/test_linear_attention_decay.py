"""LinearizedAttention(decay=True): weights decay with distance at a learned rate per head and side, the
exact no-decay limit, decoding, gradients, and what it refuses."""

from __future__ import annotations

import math

import pytest
import torch

import relinear as rl
from relinear.approx.linear_attention import DECAY_GAIN, LinearizedAttention
from relinear.recipe import RecipeError

H, HK, D, T = 4, 2, 8, 11


def _module(decay_params=None, **kwargs) -> LinearizedAttention:
    module = LinearizedAttention(H, D, generator=torch.Generator().manual_seed(0), **kwargs).double()
    if decay_params is not None:
        with torch.no_grad():
            module.decay.copy_(decay_params)
    return module


def _qkv(seed, num_queries=T, num_keys=T):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, num_queries, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, HK, num_keys, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _rates_for(lambdas: torch.Tensor) -> torch.Tensor:
    """The decay parameters that give these per-token factors lambda ([H, 2], before / after)."""
    return torch.log(-torch.log(lambdas)) / DECAY_GAIN


LAMBDAS = torch.tensor([[0.9, 0.5], [0.3, 0.95], [0.99, 0.99], [0.6, 0.1]], dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_the_kernel_times_lambda_to_the_distance(causal):
    """Against explicit weights phi(q_i) . phi(k_j) * lambda_side^|i - j| (no padding), GQA expanded by hand."""
    module = _module(_rates_for(LAMBDAS), decay=True, chunk_size=4)
    q, k, v = _qkv(1)
    scale = 0.3
    got = module(q, k, v, causal=causal, scale=scale)
    k, v = (x.repeat_interleave(H // HK, dim=1) for x in (k, v))
    phi_q = module.feature_map_q.of_scaled(q, math.sqrt(scale))
    phi_k = module.feature_map_k.of_scaled(k, math.sqrt(scale))
    offset = (torch.arange(T)[:, None] - torch.arange(T)).double()  # i - j
    decay = torch.where(offset >= 0, LAMBDAS[:, 0, None, None] ** offset, LAMBDAS[:, 1, None, None] ** -offset)
    if causal:
        decay = decay * (offset >= 0)
    weights = (phi_q @ phi_k.mT) * decay
    torch.testing.assert_close(got, weights @ v / weights.sum(-1, keepdim=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_no_decay_is_plain_linear_attention(causal):
    """The exact limit: rates of e^-100 leave the feature maps' linear attention, masks and GQA included."""
    plain = _module()
    decaying = _module(torch.full((H, 2), -10.0), decay=True)
    decaying.load_state_dict({**plain.state_dict(), "decay": decaying.decay.detach()})
    q, k, v = _qkv(2, num_queries=5)
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[1, :4] = False
    torch.testing.assert_close(decaying(q, k, v, key_mask, causal=causal), plain(q, k, v, key_mask, causal=causal),
                               rtol=1e-12, atol=1e-12)


def test_fresh_decay_is_nearly_none():
    """DECAY_INIT: a fresh module starts as pure linear attention (a key 256 tokens away keeps > 98%)."""
    rate = -_module(decay=True).log_decay(0, torch.Size([1, H, 1]))
    assert (rate > 0).all() and (torch.exp(-256 * rate) > 0.98).all()


def test_fused_feature_maps_still_decay():
    """elu is otherwise computed inside the fused op; with a decay it must go through the gated forms."""
    q, k, v = _qkv(3)
    strong = _module(_rates_for(torch.full((H, 2), 0.1, dtype=torch.float64)), feature_map="elu", decay=True)
    plain = _module(feature_map="elu")
    assert (strong(q, k, v) - plain(q, k, v)).abs().max() > 1e-2


def test_steps_reproduce_the_causal_forward_with_left_padding():
    module = _module(_rates_for(LAMBDAS), decay=True)
    q, k, v = _qkv(4)
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[1, :3] = False
    with torch.no_grad():
        want = module(q, k, v, key_mask, causal=True, scale=0.4)
        cache, steps = None, []
        for t in range(T):
            out, cache = module.step(q[:, :, t], k[:, :, t], v[:, :, t], cache, key_mask[:, t], scale=0.4)
            steps.append(out)
    real = key_mask[:, None, :, None].expand_as(want)
    torch.testing.assert_close(torch.stack(steps, dim=2)[real], want[real], rtol=1e-9, atol=1e-9)


def test_decay_trains_on_the_sides_it_uses():
    q, k, v = _qkv(5)
    for causal, sides in ((False, [True, True]), (True, [True, False])):
        module = _module(_rates_for(LAMBDAS), decay=True)
        assert any(p is module.decay for p in module.trainable_parameters())
        module(q, k, v, causal=causal).square().sum().backward()
        assert (module.decay.grad.abs().sum(0) > 0).tolist() == sides


def test_decay_needs_pure_linear_attention():
    for kwargs in ({"window": 4}, {"gate": "liger"}):
        with pytest.raises(ValueError, match="decay"):
            LinearizedAttention(H, D, decay=True, **kwargs)
        with pytest.raises(RecipeError, match="decay"):
            rl.LinearAttention(decay=True, **kwargs)
    with pytest.raises(RecipeError, match="decay must be True or False"):
        rl.LinearAttention(decay="yes")
