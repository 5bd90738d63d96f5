"""`torch.ops.relinear.mapped_linear_attention`: linear attention whose elu / relu feature map the kernels
compute from q and k. Checked against naive float64 torch (the map, then the reference linear attention), as an
op (opcheck, compile, export), inside `LinearizedAttention`, and on the forced kernel path under
TRITON_INTERPRET=1 (forward and gradients) against the torch form's autograd."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels then run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from attention_data import gradient_errors, key_mask, relative_rms, values  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_path import force_kernel_path  # noqa: E402
from op_graph_checks import opcheck_with_backward  # noqa: E402

import relinear.kernels.linear_attention  # noqa: E402,F401  (registers the ops)
from relinear.approx.linear_attention import LinearizedAttention  # noqa: E402
from relinear.kernels.linear_attention.reference import linear_attention_reference  # noqa: E402

op = torch.ops.relinear.mapped_linear_attention
NAIVE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu}
CHUNK = 64


def naive(q, k, v, mask, causal, feature_map, scale):
    """The spec: the map applied to x * sqrt(scale) in plain torch, then the quadratic reference."""
    phi = NAIVE_MAPS[feature_map]
    root = math.sqrt(scale)
    return linear_attention_reference(phi(q * root), phi(k * root), v, mask, causal)


def qkv(tq, tk, dim, dtype=torch.float64, seed=0, heads=2, requires_grad=False):
    """q, k centred on 0 so both branches of each map (and relu's zeros) occur; batch of 2."""
    tensors = (values(2, heads, tq, dim, seed=seed), values(2, heads, tk, dim, seed=seed + 1),
               values(2, heads, tk, dim, seed=seed + 2))
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in tensors)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("tq", "tk", "chunk_size"), [(9, 9, 4), (3, 10, 4), (12, 5, 3)])
def test_op_matches_map_then_reference_in_float64(feature_map, causal, tq, tk, chunk_size):
    q, k, v = qkv(tq, tk, 5, requires_grad=True)
    mask = key_mask(2, tk)
    mask[1, 0] = True
    scale = 0.3
    got = op(q, k, v, mask, causal, chunk_size, feature_map, scale)
    want = naive(q, k, v, mask, causal, feature_map, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(want, (q, k, v), grad_out),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.property
@settings(max_examples=15, deadline=None)
@given(
    feature_map=st.sampled_from(["elu", "relu"]),
    causal=st.booleans(),
    tq=st.integers(1, 12),
    tk=st.integers(1, 12),
    chunk_size=st.integers(1, 8),
    scale=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**16),
)
def test_op_matches_reference_on_any_shape(feature_map, causal, tq, tk, chunk_size, scale, seed):
    q, k, v = qkv(tq, tk, 3, seed=seed)
    mask = torch.rand(2, tk, generator=torch.Generator().manual_seed(seed)) > 0.3
    got = op(q, k, v, mask, causal, chunk_size, feature_map, scale)
    torch.testing.assert_close(got, naive(q, k, v, mask, causal, feature_map, scale), rtol=1e-10, atol=1e-12)


def test_bad_map_and_scale_are_rejected_by_name():
    q, k, v = qkv(4, 4, 3)
    with pytest.raises(ValueError, match="feature_map"):
        op(q, k, v, None, True, 4, "hedgehog", 1.0)
    with pytest.raises(ValueError, match="scale"):
        op(q, k, v, None, True, 4, "elu", 0.0)


@pytest.mark.parametrize(("causal", "checks"), [(True, None), (False, ("test_schema", "test_faketensor"))])
def test_opcheck(causal, checks):
    q, k, v = qkv(3, 10, 4, dtype=torch.float32, requires_grad=True)
    mask = key_mask(2, 10)
    opcheck_with_backward(op, (q, k, v, mask, causal, 4, "elu", 0.5),
                          **({} if checks is None else {"test_utils": checks}))


def test_compiles_on_cpu():
    q, k, v = qkv(9, 9, 4, dtype=torch.float32)
    compiled = torch.compile(op, fullgraph=True, dynamic=False)
    for feature_map in ("elu", "relu"):
        args = (q, k, v, None, True, 4, feature_map, 0.5)
        torch.testing.assert_close(compiled(*args), op(*args))


class _Attention(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attention = LinearizedAttention(2, 8, chunk_size=4, **kwargs)

    def forward(self, q, k, v, mask):
        return self.attention(q, k, v, mask, causal=True)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"feature_map": "elu"}, ["relinear.mapped_linear_attention.default"]),
    ({"feature_map": "relu"}, ["relinear.mapped_linear_attention.default"]),
    ({"feature_map": "elu", "window": 2}, ["relinear.hybrid_attention.default"]),
    ({"feature_map": "softmax"}, ["relinear.linear_attention.default"]),
])
def test_module_exports_the_fused_op_as_one_node_only_for_plain_elu_relu(kwargs, expected):
    q, k, v = qkv(6, 6, 8, dtype=torch.float32)
    graph = torch.export.export(_Attention(**kwargs), (q, k, v, key_mask(2, 6))).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert [t for t in targets if t.startswith("relinear.")] == expected


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [True, False])
def test_module_output_and_gradients_are_the_maps_attention(feature_map, causal):
    q, k, v = qkv(7, 7, 8, requires_grad=True)
    mask = key_mask(2, 7)
    module = LinearizedAttention(2, 8, feature_map=feature_map, chunk_size=4).double()
    got = module(q, k, v, mask, causal=causal, scale=0.2)
    want = naive(q, k, v, mask, causal, feature_map, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


class _CallMapped(torch.nn.Module):
    def __init__(self, *scalars):
        super().__init__()
        self.scalars = scalars

    def forward(self, q, k, v, mask):
        causal, chunk_size, feature_map, scale = self.scalars
        return op(q, k, v, mask, causal, chunk_size, feature_map, scale)


@pytest.mark.parametrize(("causal", "feature_map"), [(True, "elu"), (False, "relu")])
def test_onnx_lowering_runs_in_ort_as_the_op(causal, feature_map):
    onnxruntime = pytest.importorskip("onnxruntime")
    opset = pytest.importorskip("onnxscript").opset18
    from relinear.export import lowering

    def translation(q, k, v, mask=None, causal=False, chunk_size=64, feature_map="elu", scale=1.0):
        return lowering.mapped_linear_attention(opset, q, k, v, mask, causal, chunk_size, feature_map, scale)

    module = _CallMapped(causal, 4, feature_map, 0.4)
    q, k, v = qkv(9, 11, 4, dtype=torch.float32)
    args = (q, k, v, key_mask(2, 11))
    program = torch.onnx.export(module, args, dynamo=True, verbose=False,
                                custom_translation_table={op.default: translation})
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), module(*args), rtol=1e-4, atol=1e-5)


# The forced kernel path: Triton (interpreted) on CPU tensors against the torch form in float64.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
# bf16 gradients: q, k, the features and their gradients each round to 8 bits; up to 6.4e-3 seen (dq, elu)
GRADIENT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
KERNEL_CASES = [  # (Tq, Tk, D, dtype, masked); batch 0 of a masked case sees no key at all
    (1, 1, 16, torch.float32, False),
    (63, 63, 64, torch.float32, True),
    (65, 65, 16, torch.float32, True),
    (127, 127, 16, torch.float32, False),
    (1, 65, 64, torch.float32, True),
    (63, 63, 16, torch.bfloat16, True),
    (127, 127, 64, torch.bfloat16, True),
]


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("tq", "tk", "dim", "dtype", "masked"), KERNEL_CASES)
def test_kernel_forward_and_gradients_match_torch_form(feature_map, causal, tq, tk, dim, dtype, masked,
                                                       monkeypatch):
    kernels = pytest.importorskip("relinear.kernels.linear_attention.triton", reason="triton is not installed")
    scale = dim**-0.5
    q, k, v = qkv(tq, tk, dim, dtype=dtype, seed=tq + dim)
    mask = key_mask(2, tk) if masked else None
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = op(*exact, mask, causal, CHUNK, feature_map, scale)
    grad_out = values(*want.shape, seed=7).to(dtype)
    want_grads = torch.autograd.grad(want, exact, grad_out.double())

    got = kernels.mapped_linear_attention_cuda(q, k, v, mask, causal, CHUNK, feature_map, scale)
    assert got.dtype == dtype
    assert relative_rms(got, want) <= TOLERANCE[dtype]
    if masked:
        assert got[0].abs().max() == 0  # no visible key: zeros, not NaN

    resolved = force_kernel_path(monkeypatch)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(op(*leaves, mask, causal, CHUNK, feature_map, scale), leaves, grad_out)
    assert any("mapped_linear_attention_backward_cuda" in r for r in resolved), resolved
    assert [g.dtype for g in grads] == [dtype] * 3
    errors = gradient_errors(grads, want_grads, scale=want_grads[2])
    assert max(errors) <= GRADIENT_TOLERANCE[dtype], dict(zip("qkv", errors, strict=True))
