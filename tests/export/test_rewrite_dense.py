"""`rewrite_onnx` on dense layers: MatMul / Gemm against an initializer -> low-rank, Monarch, BTT in standard
ops. The rewritten file must compute x @ W'^T + b for the W' that relinear.approx fits (checked through the
approx module's own dense form, not through the lowering)."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch

from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.families import NotInOnnx, families
from relinear.recipe import LowRank, Monarch, Recipe

IN, HIDDEN, OUT = 13, 20, 9  # 13 and 9 leave padding in the Monarch and BTT blocks


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(IN, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _export(path, dynamo: bool, rank: int):
    """rank 2 input: the legacy exporter writes Gemm; rank 3: MatMul (+ Add)."""
    x = torch.randn(*([2, 5] if rank == 3 else [4]), IN)
    module = TinyMLP().eval()
    if dynamo:
        torch.onnx.export(module, (x,), path, dynamo=True, external_data=False, verbose=False, input_names=["x"],
                          dynamic_shapes=({0: "batch"},))
    else:
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return module


def _run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _expected(module, dense_of, x):
    """The MLP with each weight replaced by the dense matrix its fitted factors stand for."""
    up, down = module.up, module.down
    hidden = torch.relu(torch.nn.functional.linear(x, dense_of(up.weight.detach()), up.bias.detach()))
    return torch.nn.functional.linear(hidden, dense_of(down.weight.detach()))


# every registered dense family with an ONNX form, at its example setting
IN_ONNX = [f for f in families() if f.dense is not None and not isinstance(f.dense.lowering, NotInOnnx)]


def _fitted_dense(family):
    """W -> the dense matrix of the factors the family fits for its example setting (relinear.approx's math)."""
    form = family.dense

    def dense_of(w):
        (setting,) = form.settings(family.example, w)
        return form.dense(form.fit(w, setting), w.shape[1], w.shape[0])

    return dense_of


@pytest.mark.parametrize("exporter", ["dynamo-matmul", "legacy-gemm", "legacy-matmul"])
@pytest.mark.parametrize("family", IN_ONNX, ids=lambda f: f.name)
def test_dense_layers_become_fitted_factors(tmp_path, family, exporter):
    dynamo, rank = exporter.startswith("dynamo"), 2 if exporter.endswith("gemm") else 3
    module = _export(tmp_path / "in.onnx", dynamo, rank)
    dense_of = _fitted_dense(family)
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", Recipe([family.example]))
    assert report.counts == {family.name: 2}, report.skipped
    x = torch.randn(*([2, 5] if rank == 3 else [4]), IN)
    with torch.no_grad():
        expected = _expected(module, dense_of, x)
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(_run(tmp_path / "in.onnx", x), expected, atol=1e-3)
    if exporter == "legacy-gemm":
        assert "Gemm" not in {n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node}


def test_full_rank_is_exact_and_site_params_are_reported(tmp_path):
    module = _export(tmp_path / "in.onnx", True, 3)
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", Recipe([LowRank(energy=1.0)]))
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x), module(x), atol=1e-5, rtol=1e-4)
    by_size = sorted((s.params_before, s.params_after) for s in report.sites)
    assert by_size == sorted([(IN * HIDDEN, IN * (IN + HIDDEN)), (HIDDEN * OUT, OUT * (HIDDEN + OUT))])
    assert max(s.error for s in report.sites) < 1e-5


def test_max_error_skips_with_reason_and_where_selects(tmp_path):
    _export(tmp_path / "in.onnx", True, 3)
    tight = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "a.onnx", Recipe([LowRank(rank=1, max_error=1e-3)]))
    assert tight.counts == {} and len(tight.skipped) == 2
    assert all("max_error" in reason for _, _, reason in tight.skipped)
    only_up = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "b.onnx", Recipe([LowRank(rank=2, where="up")]))
    assert [s.where for s in only_up.sites] == ["up"]


def test_earlier_rule_claims_a_site_first(tmp_path):
    _export(tmp_path / "in.onnx", True, 3)
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx",
                          Recipe([Monarch(nblocks=2, where="down"), LowRank(rank=2)]))
    assert report.counts == {"monarch": 1, "low_rank": 1}


@pytest.mark.parametrize("family", IN_ONNX, ids=lambda f: f.name)
def test_same_recipe_same_weights_as_the_torch_front_end(tmp_path, family):
    from relinear.rewrite.offline import rewrite

    module = _export(tmp_path / "in.onnx", True, 3)
    recipe = Recipe([family.example])
    rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", recipe)
    fast, _ = rewrite(module, (torch.randn(2, 5, IN),), recipe, progress=False)
    torch_factors = [p.detach() for n, p in fast.named_parameters() if n.startswith("relinear.") and p.dim() >= 2]
    onnx_factors = [torch.from_numpy(onnx.numpy_helper.to_array(t)).transpose(-1, -2)
                    for t in onnx.load(tmp_path / "out.onnx").graph.initializer if ".relinear." in t.name]
    factors_per_layer = len(family.dense.fit(module.up.weight.detach(), family.dense.settings(
        family.example, module.up.weight)[0]))
    assert len(onnx_factors) == len(torch_factors) == 2 * factors_per_layer
    for factor in onnx_factors:
        assert any(f.shape == factor.shape and torch.equal(f, factor) for f in torch_factors), factor.shape
