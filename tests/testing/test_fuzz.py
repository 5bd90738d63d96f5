"""Fuzz: random small transformers and attention problems through whole recipes.

Every rewrite is either absent (reported as left alone with a reason) or within tolerance; where the
recipe is exact (a window covering every key, a full-rank factorization) the model is unchanged to 1e-4.
The property functions here are what tests/testing/test_mutations.py runs against broken rules.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st

import relinear as rl
from relinear.testing import (
    attention_inputs,
    check_rewrite,
    for_all,
    linear_attention_formula,
    tiny_transformers,
)

pytestmark = pytest.mark.property

EXACT = dict(rtol=1e-4, atol=1e-4)
FEATURE_MAPS = ("elu", "relu", "hedgehog")


def fuzz_examples(cap: int) -> int:
    """The profile's budget, capped: each example is a torch.export of a whole model."""
    return min(settings.default.max_examples, cap)


class Attend(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.causal, self.scale = case.is_causal, case.scale
        self.gqa = case.k.shape[1] != case.q.shape[1]

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                              scale=self.scale, enable_gqa=self.gqa)


def _attention_args(case):
    mask = case.attn_mask
    return (case.q, case.k, case.v) + (() if mask is None else (mask,))


def _real_queries(case):
    return case.real_queries[:, None, :, None]


def transformer_rewrite_holds(drawn) -> None:
    case, feature_map, dense = drawn
    tokens = case.args[0].shape[1]
    recipe = rl.Recipe([rl.LinearAttention(feature_map=feature_map, window=tokens), dense])
    layers = len(case.model.blocks)
    check_rewrite(case.model, case.args, recipe, **EXACT, compare=case.real_tokens[..., None],
                  candidates={"linear_attention": layers, dense.name: case.dense_layers})


TRANSFORMER_CASES = st.tuples(
    tiny_transformers(),
    st.sampled_from(FEATURE_MAPS),
    st.sampled_from((rl.LowRank(energy=1.0), rl.Monarch(nblocks=1))),
)


def covering_window_is_exact(case) -> None:
    """A window as long as the sequence makes hybrid attention softmax attention exactly."""
    recipe = rl.Recipe([rl.LinearAttention(feature_map="elu", window=case.tokens)])
    check_rewrite(Attend(case), _attention_args(case), recipe, **EXACT, compare=_real_queries(case),
                  candidates={"linear_attention": 1})


def linear_attention_matches_formula(case) -> None:
    """Without a window, the rewrite computes the ELU linear attention formula (float64, 1e-9)."""
    fast, report = rl.rewrite(Attend(case), _attention_args(case),
                              rl.Recipe([rl.LinearAttention(feature_map="elu")]), progress=False)
    assert report.counts == {"linear_attention": 1}, report.skipped
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.q.shape[-1])
    expected = linear_attention_formula(case.q, case.k, case.v, case.keep, lambda x: F.elu(x) + 1, scale)
    real = _real_queries(case).expand_as(expected)
    with torch.no_grad():
        actual = fast(*_attention_args(case))
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-9, atol=1e-9)


ATTENTION_CASES = attention_inputs(tokens=(2, 6), head_dim=(1, 4), heads=(1, 4))
FLOAT64_CASES = attention_inputs(tokens=(1, 6), head_dim=(1, 4), heads=(1, 4), dtypes=(torch.float64,))


def test_random_transformers_rewrite_exactly_or_not_at_all():
    for_all(TRANSFORMER_CASES, transformer_rewrite_holds, max_examples=fuzz_examples(10))


def test_covering_window_is_exact_on_random_attention():
    for_all(ATTENTION_CASES, covering_window_is_exact, max_examples=fuzz_examples(15))


def test_linear_attention_matches_the_formula_on_random_attention():
    for_all(FLOAT64_CASES, linear_attention_matches_formula, max_examples=fuzz_examples(15))
