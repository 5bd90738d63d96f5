"""The sparse families, whitened low rank and detection through the front ends: `rl.rewrite` with calibration
batches (checked against norms and Gram matrices computed by hand), the torch.compile backend, `to_onnx` and
`rewrite_onnx` (ORT against the rewritten torch model), and detection of weights built to be structured."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

import relinear as rl
from relinear.approx import sparse as sparse_math
from relinear.approx.inputs import InputStats
from relinear.approx.monarch import monarch_grid, monarch_to_dense
from relinear.approx.whiten import whitened_svd_factors
from relinear.export import rewrite_onnx, to_onnx

SPARSE = [rl.Sparse24(), rl.Sparse(density=0.25), rl.BlockSparse(block=8, density=0.5),
          rl.SparseLowRank(density=0.25, rank=2)]


class MLP(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _new_tensors(fast) -> dict[str, torch.Tensor]:
    holder = fast.get_submodule("relinear")
    return {n: t.detach() for n, t in [*holder.named_parameters(), *holder.named_buffers()]}


def _inputs(seed, scales):
    """Tokens whose features have very different scales: Wanda's scores then differ from magnitude's."""
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed)) * scales


def test_wanda_reads_the_example_and_every_calibration_batch():
    model = MLP().eval()
    example = _inputs(1, torch.ones(32))
    loud = torch.ones(32)
    loud[::3] = 30.0  # the calibration data weighs every third feature up
    batches = [_inputs(2, loud), (_inputs(3, loud),)]
    recipe = rl.Recipe([rl.Sparse24(score="wanda", where="up")])
    fast, report = rl.rewrite(model, (example,), recipe, calibration=batches, progress=False)
    assert report.counts == {"sparse24": 1}
    rows = torch.cat([example.reshape(-1, 32), batches[0].reshape(-1, 32), batches[1][0].reshape(-1, 32)])
    values, positions = sparse_math.fit_24(model.up.weight, "wanda", rows.double().norm(dim=0))
    got = [t for n, t in _new_tensors(fast).items() if not n.endswith("bias")]
    assert torch.equal(got[0], values) and torch.equal(got[1], positions)
    alone, _ = rl.rewrite(model, (example,), recipe, progress=False)
    assert not torch.equal([t for n, t in _new_tensors(alone).items() if not n.endswith("bias")][1], positions)
    x = _inputs(4, loud)
    with torch.no_grad():
        pruned = torch.nn.functional.linear(x, sparse_math.dense_24(values, positions), model.up.bias)
        torch.testing.assert_close(fast(x), model.down(torch.relu(pruned)))


def test_wanda_with_equal_input_norms_is_magnitude_end_to_end():
    model = MLP().eval()
    q, _ = torch.linalg.qr(torch.randn(40, 32, generator=torch.Generator().manual_seed(0)))
    example = (q * 2.0).reshape(1, 40, 32)  # orthonormal columns: every input feature has norm 2
    for family in (rl.Sparse24, rl.Sparse, rl.BlockSparse):
        wanda, _ = rl.rewrite(model, (example,), rl.Recipe([family(score="wanda", where="up")]), progress=False)
        magnitude, _ = rl.rewrite(model, (example,), rl.Recipe([family(score="magnitude", where="up")]),
                                  progress=False)
        for a, b in zip(_new_tensors(wanda).values(), _new_tensors(magnitude).values(), strict=True):
            assert torch.equal(a, b)


def test_whitened_low_rank_is_never_worse_on_the_data():
    model = MLP().eval()
    mixing = torch.randn(32, 32, generator=torch.Generator().manual_seed(5)) * torch.logspace(0, 1.5, 32)
    example = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(6)) @ mixing
    for rank in (1, 4, 12):
        errors = {}
        for whiten in (False, True):
            recipe = rl.Recipe([rl.LowRank(rank=rank, whiten=whiten, where="up")])
            _, report = rl.rewrite(model, (example,), recipe, progress=False)
            errors[whiten] = report.sites[0].error
        assert errors[True] <= errors[False] + 1e-6, (rank, errors)
    batch = torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(7)) @ mixing
    fast, report = rl.rewrite(model, (example,), rl.Recipe([rl.LowRank(rank=4, whiten=True, where="up")]),
                              calibration=[batch], progress=False)
    gram = InputStats.of(torch.cat([example.reshape(-1, 32), batch.reshape(-1, 32)]), with_gram=True).gram
    up, down = whitened_svd_factors(model.up.weight.detach(), gram, 4)
    new = _new_tensors(fast)
    assert torch.equal(new[next(n for n in new if n.endswith("_0"))], down)
    assert torch.equal(new[next(n for n in new if n.endswith("_1"))], up)


@pytest.mark.parametrize("config", SPARSE, ids=lambda c: c.name)
def test_backend_agrees_with_the_offline_rewrite(config):
    model = MLP().eval()
    x = torch.randn(3, 32)
    recipe = rl.Recipe([config])
    fast, report = rl.rewrite(model, (x,), recipe, progress=False)
    assert report.counts == {config.name: 2}
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="relinear", options={"recipe": recipe})(x)
        torch.testing.assert_close(got, fast(x), rtol=1e-5, atol=1e-5)
    assert rl.last_report().counts == report.counts


def _ort(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


class EmbeddedMLP(MLP):
    """Token ids in: the feature dim is the embedding's (static in the file), as in a language model; the
    sparse translations, like BTT's, need it static."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 32)

    def forward(self, ids):
        return super().forward(self.embed(ids))


@pytest.mark.parametrize("config", SPARSE, ids=lambda c: c.name)
def test_to_onnx_runs_the_rewritten_model(tmp_path, config):
    model = EmbeddedMLP().eval()
    x = torch.randint(0, 50, (2, 5))
    report = to_onnx(model, (x,), tmp_path / "m.onnx", rl.Recipe([config]))
    fast, _ = rl.rewrite(model, (x,), rl.Recipe([config]), progress=False)
    assert report.counts == {config.name: 2}
    other = torch.randint(0, 50, (3, 7))  # another batch and length
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "m.onnx", other), fast(other), rtol=1e-4, atol=1e-5)


def test_rewrite_onnx_skips_what_needs_activations(tmp_path):
    model = MLP().eval()
    torch.onnx.export(model, (torch.randn(2, 5, 32),), tmp_path / "in.onnx", dynamo=True, verbose=False)
    recipe = rl.Recipe([rl.Sparse24(score="wanda"), rl.LowRank(rank=2, whiten=True)])
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", recipe)
    assert report.counts == {} and len(report.skipped) == 4
    assert all("an ONNX file has no activations" in reason for _, _, reason in report.skipped)


class Structured(torch.nn.Module):
    """Five 64 x 64 layers: exactly rank 3, 2:4, a quarter of 16 x 16 blocks, Monarch with 8 blocks, and dense."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(5))
        weights = [torch.randn(64, 3, generator=gen) @ torch.randn(3, 64, generator=gen)]
        dense = torch.randn(64, 64, generator=gen)
        weights.append(dense * sparse_math.mask_24(dense.abs()))
        keep = torch.zeros(4, 4, dtype=torch.bool)
        keep[torch.arange(4), torch.randperm(4, generator=gen)] = True
        weights.append(torch.randn(64, 64, generator=gen) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
        grid = monarch_grid(64, 64, 8)
        blocks = (torch.randn(*grid.core1_shape, generator=gen), torch.randn(*grid.core2_shape, generator=gen))
        weights.append(monarch_to_dense(*blocks, 64, 64))
        weights.append(torch.randn(64, 64, generator=gen))
        with torch.no_grad():
            for layer, weight in zip(self.layers, weights, strict=True):
                layer.weight.copy_(weight / 8)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _check_detected(report):
    assert report.counts == {"detect": 4}
    kinds = [s.detail.split()[0] for s in report.sites]
    assert kinds == ["form=low_rank", "form=sparse24", "form=block_sparse", "form=monarch"]
    assert all(s.params_after < s.params_before for s in report.sites)
    ((_, where, reason),) = report.skipped
    assert where.endswith("4") and "no exact cheaper structure" in reason


def test_detect_rewrites_exact_structure_losslessly(tmp_path):
    model = Structured().eval()
    x = torch.randn(2, 6, 64)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.Detect()]), progress=False)
    _check_detected(report)
    assert max(s.error for s in report.sites) < 1e-5
    other = torch.randn(3, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(other), model(other), rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="relinear", options={"recipe": rl.Recipe([rl.Detect()])})
        torch.testing.assert_close(compiled(other), model(other), rtol=1e-5, atol=1e-5)
    _check_detected(rl.last_report())
    torch.onnx.export(model, (x,), tmp_path / "in.onnx", dynamo=True, verbose=False,
                      dynamic_shapes=({0: "batch", 1: "tokens"},))
    _check_detected(rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", rl.Recipe([rl.Detect()])))
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "out.onnx", other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [rl.Sparse(density=0.1), rl.Sparse(density=0.5), rl.Sparse24(),
                                    rl.BlockSparse(block=4, density=0.5), rl.SparseLowRank(density=0.25, rank=2)],
                         ids=["csr-matmul", "csr-dense-form", "2:4", "bsr", "sparse+low-rank"])
def test_gradient_of_kept_values_is_the_dense_gradient_at_the_kept_entries(config):
    """What distillation trains of a sparse layer: d<g, y>/d values, scattered back into W's shape, equals the
    dense gradient g^T x on the kept entries and zero elsewhere (at 10% density the CSR matmul runs)."""
    from relinear.families import family_of

    form = family_of(config).dense
    family_of(config).load_kernels()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    factors = list(form.fit(weight, form.settings(config, weight)[0]))
    values = factors[0].detach().requires_grad_()
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(form.call(x, (values, *factors[1:]), None, 24), values, g)
    # the sparse part alone in W's shape: the low-rank factors of sparse+low-rank set to zero
    sparse_only = [torch.zeros_like(f) if f.is_floating_point() else f for f in factors[1:]]
    kept = form.dense((torch.ones_like(values), *sparse_only), 40, 24) != 0
    assert 0 < kept.double().mean() < 0.6
    torch.testing.assert_close(form.dense((grad, *sparse_only), 40, 24), (g.T @ x) * kept, rtol=1e-12, atol=1e-12)
