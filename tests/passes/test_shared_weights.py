"""One weight, one replacement: a weight used at several call sites (ALBERT's shared layer, a module calling
one Linear twice) becomes one set of new parameters that every site uses, not one copy per site."""

from __future__ import annotations

import copy

import torch

import relinear as rl

RANK = 3


def _rank_limited(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """The reference: a copy whose every nn.Linear weight is its best rank-`rank` approximation (a float64
    SVD written out here, not relinear's factors)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (m for m in reference.modules() if isinstance(m, torch.nn.Linear)):
            u, s, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
            lin.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
    return reference


def _new_parameters(fast) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in fast.named_parameters() if n.startswith("relinear.")}


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_a_linear_called_twice_gets_one_shared_replacement():
    model, x = Twice().eval(), torch.randn(5, 16)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank=RANK)]), progress=False)
    assert report.counts == {"low_rank": 2}
    first, second = report.sites
    assert (first.params_before, first.params_after) == (16 * 16 + 16, RANK * 32 + 16)
    assert (second.params_before, second.params_after) == (0, 0) and "shares lin's weights" in second.detail
    assert sorted(_new_parameters(fast).values()) == sorted([torch.Size([RANK, 16]), torch.Size([16, RANK]),
                                                             torch.Size([16])])
    torch.testing.assert_close(fast(x), _rank_limited(model, RANK)(x), rtol=1e-4, atol=1e-5)
    fast(x).sum().backward()  # both sites train the one copy
    assert all(p.grad is not None for n, p in fast.named_parameters() if n.startswith("relinear."))


def test_albert_shared_layer_is_rewritten_once_per_weight():
    import transformers as tf

    config = tf.AlbertConfig(vocab_size=64, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                             attn_implementation="sdpa")
    torch.manual_seed(0)
    model = tf.AlbertModel(config).eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LowRank(rank=RANK)]), progress=False)
    assert len(linears) == 8 and report.counts == {"low_rank": 14}  # 6 shared linears called by 2 layers
    assert len([s for s in report.sites if "shares" in s.detail]) == 6
    assert len(_new_parameters(fast)) == 3 * len(linears)  # two factors and a bias per weight, not per site
    assert sum(s.params_after for s in report.sites) == sum(RANK * sum(m.weight.shape) + m.out_features
                                                             for m in linears)
    with torch.no_grad():
        got = fast(ids).last_hidden_state
        want = _rank_limited(model, RANK)(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
