"""Distillation of rewritten dense layers (`rl.calibrate(..., distill_steps=N)`): every dense family's weights
train and the loss falls, a sparse form's kept positions never move (pruned entries stay exactly zero, 2:4 groups
keep at most 2 nonzeros, the BSR blocks stay where they were), and the teacher never changes."""

from __future__ import annotations

import pytest
import torch

import relinear as rl
from relinear.approx import sparse as sparse_math
from relinear.families import families
from relinear.passes.dense import dense_forms, dense_site_parameters
from tests.model_zoo import make_model, padded_batch

DENSE = [f for f in families() if f.dense is not None]
# a setting of each family that fits both layers of MLP (32 -> 64 -> 16)
CONFIGS = {"sparse": rl.Sparse(density=0.25), "sparse24": rl.Sparse24(), "block_sparse": rl.BlockSparse(block=8),
           "sparse_low_rank": rl.SparseLowRank(density=0.25, rank=2), "low_rank": rl.LowRank(rank=4),
           "monarch": rl.Monarch(nblocks=4), "btt": rl.BTT(rank=2)}


LAYERS = [(32, 64), (64, 16)]  # (in, out) of MLP's sites, in graph order


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _batches(n=4):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=gen),) for _ in range(n)]


def _sites(fast):
    """(form, factors) of every rewritten dense site: the op's tensor arguments between x and the bias."""
    forms = dense_forms()
    holder = fast.get_submodule("relinear")
    found = []
    for node in fast.graph.nodes:
        if node.op == "call_function" and node.target in forms:
            names = [a.name for a in node.target._schema.arguments]
            factors = [getattr(holder, arg.target.split(".")[-1]).detach().clone()
                       for arg in node.args[1:names.index("bias")]]
            found.append((forms[node.target], factors))
    return found


def test_every_dense_family_has_a_config_here():
    assert set(CONFIGS) == {f.name for f in DENSE}


@pytest.mark.parametrize("family", DENSE, ids=lambda f: f.name)
def test_distillation_trains_each_family_and_keeps_its_structure(family):
    model = MLP().eval()
    teacher_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = _batches()
    fast, report = rl.rewrite(model, batches[0], rl.Recipe([CONFIGS[family.name]]), progress=False)
    assert report.counts == {family.name: 2}
    before = _sites(fast)
    buffers = {n: b.clone() for n, b in fast.named_buffers()}
    history = rl.calibrate(fast, teacher=model, batches=batches, distill_steps=30, tune_lr=3e-3, progress=False)
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    for name, p in model.named_parameters():  # the teacher is still the original
        assert torch.equal(p, teacher_before[name])
    assert all(torch.equal(b, buffers[n]) for n, b in fast.named_buffers())  # index tensors: the masks
    for (form, old), (_, new), (in_f, out_f) in zip(before, _sites(fast), LAYERS, strict=True):
        w_old, w_new = form.dense(old, in_f, out_f), form.dense(new, in_f, out_f)
        assert not torch.equal(w_old, w_new)  # it trained
        if family.name in ("sparse", "sparse24", "block_sparse"):
            pruned = w_old == 0
            assert pruned.float().mean() >= 0.4 and (w_new[pruned] == 0).all()  # pruned entries stay exactly zero


def test_two_of_four_pattern_holds_after_distillation():
    model = MLP().eval()
    batches = _batches()
    fast, _ = rl.rewrite(model, batches[0], rl.Recipe([rl.Sparse24()]), progress=False)
    rl.calibrate(fast, teacher=model, batches=batches, distill_steps=10, tune_lr=1e-2, progress=False)
    for _, (values, positions) in _sites(fast):
        groups = sparse_math.dense_24(values, positions).reshape(values.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all()


def test_block_pattern_is_unchanged_by_distillation():
    model = MLP().eval()
    batches = _batches()
    fast, _ = rl.rewrite(model, batches[0], rl.Recipe([rl.BlockSparse(block=8, density=0.5)]), progress=False)
    before = _sites(fast)
    rl.calibrate(fast, teacher=model, batches=batches, distill_steps=10, tune_lr=1e-2, progress=False)
    for (_, (_, crow, col)), (_, (values, crow_after, col_after)) in zip(before, _sites(fast), strict=True):
        assert torch.equal(crow, crow_after) and torch.equal(col, col_after)
        assert (values.flatten(1).abs().amax(-1) > 0).all()  # every stored block still holds weights


def test_only_the_rewritten_weights_train():
    model = MLP().eval()
    batches = _batches()
    fast, _ = rl.rewrite(model, batches[0], rl.Recipe([rl.LowRank(rank=4, where="up")]), progress=False)
    trained = dense_site_parameters(fast)
    assert sorted(p.shape for p in trained) == sorted([torch.Size([4, 32]), torch.Size([64, 4]),
                                                       torch.Size([64])])  # down, up, bias
    original = {n: p.detach().clone() for n, p in fast.named_parameters() if n.startswith("down")}
    rl.calibrate(fast, teacher=model, batches=batches, distill_steps=5, tune_lr=1e-2, progress=False)
    for name, p in fast.named_parameters():
        if name in original:
            assert torch.equal(p, original[name])  # the layer the recipe left alone


class Twice(torch.nn.Module):
    """One Linear called at two sites: one replacement, shared."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_a_weight_shared_by_two_sites_trains_once():
    model = Twice().eval()
    batches = _batches()
    fast, report = rl.rewrite(model, batches[0], rl.Recipe([rl.LowRank(rank=4)]), progress=False)
    assert report.counts == {"low_rank": 2}
    trained = dense_site_parameters(fast)
    assert len(trained) == 3  # down, up, bias: once, though two ops read them
    history = rl.calibrate(fast, teacher=model, batches=batches, distill_steps=20, tune_lr=3e-3, progress=False)
    assert sum(history[-5:]) < sum(history[:5])


def test_dense_only_model_needs_distillation_and_a_teacher():
    model = MLP().eval()
    batches = _batches()
    fast, _ = rl.rewrite(model, batches[0], rl.Recipe([rl.Sparse24()]), progress=False)
    with pytest.raises(ValueError, match="distillation only"):
        rl.calibrate(fast, teacher=model, batches=batches, steps=5, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        rl.calibrate(fast, batches=batches, distill_steps=5, progress=False)


def test_attention_and_dense_layers_train_together():
    model = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert", lengths=(16, 11))
    recipe = rl.Recipe([rl.LinearAttention(feature_map="hedgehog"), rl.LowRank(rank=8, where="*intermediate*")])
    fast, report = rl.rewrite(model, (ids, mask), recipe, progress=False)
    assert report.counts == {"linear_attention": 2, "low_rank": 2}
    batches = [padded_batch("bert", lengths=(16, 11), generator_seed=s) for s in range(3)]
    dense = dense_site_parameters(fast)
    start = [p.detach().clone() for p in dense]
    history = rl.calibrate(fast, teacher=model, batches=batches, steps=3, lr=1e-2, progress=False)
    assert len(history) == 3
    assert all(torch.equal(p, s) for p, s in zip(dense, start, strict=True))  # attention transfer alone
    history = rl.calibrate(fast, teacher=model, batches=batches, steps=2, lr=1e-2, distill_steps=3, tune_lr=1e-3,
                           progress=False)
    assert len(history) == 5
    assert all(not torch.equal(p, s) for p, s in zip(dense, start, strict=True))
