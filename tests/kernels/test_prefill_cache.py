"""`LinearizedAttention.prefill_cache` builds in one pass the cache that `step` holds after a prompt: every
field equals the one the token-by-token steps leave (the tested decoding reference), with GQA and left
padding, for prompts shorter and longer than the window and with sinks that stay in and leave the window."""

import dataclasses

import pytest
import torch

from relinear.approx.linear_attention import LinearizedAttention

B, H, HK, D = 2, 4, 2, 8
VARIANTS = {
    "elu": {"feature_map": "elu"},
    "hedgehog": {"feature_map": "hedgehog"},
    "decay": {"feature_map": "hedgehog", "decay": True},
    "decay x2": {"feature_map": "elu", "decay": 2},
    "hedgehog window 3": {"feature_map": "hedgehog", "window": 3},
    "hedgehog window 2 sinks 2": {"feature_map": "hedgehog", "window": 2, "sinks": 2},
    "hedgehog window 6 sinks 3": {"feature_map": "hedgehog", "window": 6, "sinks": 3},
    "liger window 3": {"gate": "liger", "window": 3},
}


def _fields(cache) -> dict[str, torch.Tensor]:
    """Every tensor of a DecodeCache, by a dotted name."""
    out = {}
    if cache.linear is not None:
        out["linear.state"], out["linear.normalizer"] = cache.linear
    if cache.window is not None:
        out.update({f"window.{f.name}": getattr(cache.window, f.name) for f in dataclasses.fields(cache.window)})
    return out


@pytest.mark.parametrize("length", [4, 11])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_cache_equals_the_cache_of_the_steps(variant, length):
    gen = torch.Generator().manual_seed(1)
    module = LinearizedAttention(H, D, generator=gen, **VARIANTS[variant]).double()
    with torch.no_grad():
        for p in module.parameters():  # trained-looking values: a nonzero gate, decay and magnitude
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    k, v = (torch.randn(B, HK, length, D, generator=gen, dtype=torch.float64) for _ in range(2))
    key_mask = torch.ones(B, length, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    with torch.no_grad():
        cache = None
        for t in range(length):
            q_t = torch.randn(B, H, D, generator=gen, dtype=torch.float64)  # the query does not enter the cache
            _, cache = module.step(q_t, k[:, :, t], v[:, :, t], cache, key_mask[:, t], scale=0.4)
        built = module.prefill_cache(k, v, key_mask, scale=0.4)
    want, got = _fields(cache), _fields(built)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_sinks_left_the_window_in_the_prompt():
    """The case the sink slots exist for: some sinks left the window, so the right-aligned sink buffer holds them."""
    module = LinearizedAttention(H, D, feature_map="hedgehog", window=2, sinks=2).double()
    k, v = (torch.randn(B, HK, 7, D, dtype=torch.float64) for _ in range(2))
    key_mask = torch.ones(B, 7, dtype=torch.bool)
    key_mask[1, :4] = False  # row 1: sinks at positions 4 and 5, the first of which left the two-slot window
    cache = module.prefill_cache(k, v, key_mask).window
    assert cache.sink_visible.tolist() == [[True, True], [False, True]]
    torch.testing.assert_close(cache.sink_keys[1, :, 1], k[1, :, 4].repeat_interleave(H // HK, dim=0))
