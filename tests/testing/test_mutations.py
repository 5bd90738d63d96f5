"""The property suite catches deliberately broken rewrites: each mutant monkeypatches one function of
relinear, and the same properties the fuzz tests run (tests/testing/test_fuzz.py) must then fail."""

import pytest
import torch
import torch.nn.functional as F
from test_fuzz import (
    ATTENTION_CASES,
    FLOAT64_CASES,
    covering_window_is_exact,
    linear_attention_matches_formula,
)

import relinear.passes.attention as attention_pass
from relinear.approx.feature_maps import EluFeatureMap
from relinear.approx.linear_attention import LinearizedAttention
from relinear.testing import for_all

pytestmark = pytest.mark.property

EXAMPLES = 15


class WrongScale(LinearizedAttention):
    def forward(self, q, k, v, key_mask=None, causal=False, scale=None):
        return super().forward(q, k, v, key_mask=key_mask, causal=causal, scale=scale * 1.1)


class WindowOffByOne(LinearizedAttention):
    def __init__(self, *args, window=0, **kwargs):
        super().__init__(*args, window=max(window - 1, 0), **kwargs)


def _all_keys(mask, kind, query):
    return torch.ones(query.shape[0], mask.shape[-1], dtype=torch.bool)


def _wrong_scale(mp):
    mp.setattr(attention_pass, "LinearizedAttention", WrongScale)


def _dropped_mask(mp):
    mp.setattr(attention_pass, "key_mask_from", _all_keys)  # a mask whose shape proves it is key padding
    mp.setattr(attention_pass, "expand_keys", lambda keys, query: _all_keys(keys, None, query))  # a guarded one


def _window_off_by_one(mp):
    mp.setattr(attention_pass, "LinearizedAttention", WindowOffByOne)


def _feature_map_constant(mp):
    off = lambda self, x: F.elu(x) + 1.001  # noqa: E731  (0.1% off)
    mp.setattr(EluFeatureMap, "forward", off)
    mp.setattr(EluFeatureMap, "of_scaled", lambda self, x, scale: off(self, x * scale))  # the fused fast path


MUTANTS = {
    "wrong scale": (_wrong_scale, ATTENTION_CASES, covering_window_is_exact),
    "dropped mask": (_dropped_mask, ATTENTION_CASES, covering_window_is_exact),
    "window off by one": (_window_off_by_one, ATTENTION_CASES, covering_window_is_exact),
    "feature map constant off by 0.1%": (_feature_map_constant, FLOAT64_CASES, linear_attention_matches_formula),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_property_fails_under_the_mutant_and_holds_without_it(mutant, monkeypatch):
    mutate, cases, prop = MUTANTS[mutant]
    for_all(cases, prop, max_examples=EXAMPLES)
    with monkeypatch.context() as mp:
        mutate(mp)
        with pytest.raises(AssertionError):
            for_all(cases, prop, max_examples=EXAMPLES, shrink=False)
