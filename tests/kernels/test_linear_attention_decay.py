"""LinearizedAttention(decay=True): weights decay with distance at a learned rate per head and side, the
exact no-decay limit, decoding, gradients, and what it refuses; decay=n: n such attentions mixed per head."""

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
    torch.testing.assert_close(got, _explicit_decay(module, q, k, v, LAMBDAS, causal, scale), rtol=1e-10, atol=1e-10)


def _explicit_decay(module, q, k, v, lambdas, causal, scale, key_mask=None):
    """Normalized phi(q_i) . phi(k_j) * lambda_side^|i - j| weights, written out ([H, 2] lambdas, GQA expanded
    by hand); a masked key neither counts nor counts in the distance."""
    k, v = (x.repeat_interleave(H // HK, dim=1) for x in (k, v))
    phi_q = module.feature_map_q.of_scaled(q, math.sqrt(scale))
    phi_k = module.feature_map_k.of_scaled(k, math.sqrt(scale))
    weights = phi_q @ phi_k.mT
    offset = (torch.arange(T)[:, None] - torch.arange(T)).double()  # i - j, batch-independent without a mask
    if key_mask is not None:
        position = key_mask.double().cumsum(-1)  # distances count real keys only
        offset = position[:, None, :, None] - position[:, None, None, :]
        weights = weights * key_mask[:, None, None, :]
    decay = torch.where(offset >= 0, lambdas[:, 0, None, None] ** offset, lambdas[:, 1, None, None] ** -offset)
    weights = weights * (decay * (offset >= 0) if causal else decay)
    return weights @ v / weights.sum(-1, keepdim=True)


LAMBDA_SETS = torch.tensor([[[0.9, 0.5], [0.3, 0.95], [0.99, 0.99], [0.6, 0.1]],
                            [[0.2, 0.7], [0.999, 0.4], [0.5, 0.5], [0.9, 0.99]],
                            [[0.7, 0.7], [0.6, 0.8], [0.1, 0.2], [0.95, 0.3]]], dtype=torch.float64)  # [n, H, 2]


def _mixed(rates: int, mix: torch.Tensor | None = None, **kwargs) -> LinearizedAttention:
    module = _module(decay=rates, **kwargs)
    with torch.no_grad():
        module.decay.copy_(_rates_for(LAMBDA_SETS[:rates].transpose(0, 1)))
        module.decay_mix.copy_(torch.randn(H, rates, generator=torch.Generator().manual_seed(9)) if mix is None
                               else mix)
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_rates_mix_their_own_normalized_attentions(causal):
    """decay=3: sum_g softmax(mix[h])_g * (attention with lambdas g), each written out and normalized alone;
    with padding (right, and a hole), which must neither count nor decay in any of them."""
    module = _mixed(3, chunk_size=4)
    q, k, v = _qkv(6)
    key_mask = torch.ones(2, T, dtype=torch.bool)
    key_mask[1, 7:] = False
    key_mask[0, 2] = False
    got = module(q, k, v, key_mask, causal=causal, scale=0.3)
    weights = torch.softmax(module.decay_mix.detach(), -1)
    want = sum(weights[:, g, None, None] * _explicit_decay(module, q, k, v, LAMBDA_SETS[g], causal, 0.3, key_mask)
               for g in range(3))
    real = key_mask[:, None, :, None].expand_as(want)  # a padding query's distances are not defined
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)


def test_equal_rates_are_one_rate():
    """The exact limit: n copies of one rate, mixed by any weights, are that rate alone."""
    single = _module(_rates_for(LAMBDAS), decay=True)
    mixed = _module(decay=3)
    mixed.load_state_dict({**single.state_dict(), "decay": _rates_for(LAMBDAS)[:, None].expand(H, 3, 2),
                           "decay_mix": torch.randn(H, 3)})
    q, k, v = _qkv(7)
    for causal in (False, True):
        torch.testing.assert_close(mixed(q, k, v, causal=causal), single(q, k, v, causal=causal),
                                   rtol=1e-12, atol=1e-12)


def test_fresh_rates_span_none_to_local_and_favour_none():
    """Two fresh rates: lambda ~1 (none) and e^-1 (local), mixed 88 : 12."""
    module = _module(decay=2)
    lambdas = torch.exp(module.log_decay(0, torch.Size([1, 2 * H, 1]))).view(H, 2)
    assert (lambdas[:, 0] > 0.9999).all()
    torch.testing.assert_close(lambdas[:, 1], torch.full((H,), math.exp(-1), dtype=torch.float64))
    assert (torch.softmax(module.decay_mix, -1)[:, 0] > 0.85).all()


def test_mixed_rates_stay_in_the_hull_of_what_each_query_sees():
    """A positive feature map: every output is a convex mix of the values its query may see (causal: the
    keys up to it), whatever the rates and mix."""
    module = _mixed(3)
    q, k, v = _qkv(8)
    v = v.repeat_interleave(H // HK, dim=1)
    out = module(q, k, v[:, ::H // HK], causal=True)
    for i in range(T):
        seen = v[:, :, : i + 1]
        assert (out[:, :, i] <= seen.amax(2) + 1e-12).all() and (out[:, :, i] >= seen.amin(2) - 1e-12).all()


def test_every_rate_and_the_mix_train():
    q, k, v = _qkv(5)
    module = _mixed(3)
    trained = module.trainable_parameters()
    assert any(p is module.decay for p in trained) and any(p is module.decay_mix for p in trained)
    module(q, k, v).square().sum().backward()
    assert (module.decay.grad.abs().sum(0) > 0).all() and (module.decay_mix.grad.abs().sum(0) > 0).all()


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


@pytest.mark.parametrize("rates", [1, 2])
def test_steps_reproduce_the_causal_forward_with_left_padding(rates):
    module = _module(_rates_for(LAMBDAS), decay=True) if rates == 1 else _mixed(rates)
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
    for bad in ("yes", -1, 2.0):
        with pytest.raises(RecipeError, match="decay must be True, False or a number of rates"):
            rl.LinearAttention(decay=bad)
        with pytest.raises(ValueError, match="decay must be True, False or a number of rates"):
            LinearizedAttention(H, D, decay=bad)
    assert rl.LinearAttention(decay=2).decay == 2
