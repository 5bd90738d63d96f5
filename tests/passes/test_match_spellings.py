"""Every spelling of plain softmax attention in tests/attention_styles.py is found by both front ends (the
`torch.export` graph of `rl.rewrite` and the Dynamo graph of the backend) and, with a window covering every
key, the rewritten model equals the original on the real rows."""

import pytest
import torch

import relinear as rl
from tests import attention_styles as styles

EXACT = rl.Recipe([rl.LinearAttention(window=64)])
REWRITTEN = [
    "timm", "nanogpt", "x_transformers", "latent_diffusion", "latent_diffusion_cross", "matmul_einsum",
    "where_full_like", "where_tensor_inf", "two_masked_fills", "float_upcast", "gqa_repeat_interleave",
    "perceiver_latents", "mha_batch_first", "mha_time_first", "mha_functional", "softmax_view_bmm", "baddbmm_flat",
]
# the backend's compile is slow on CI's two cores: these cover each front-end fix (the MHA expansion, the einsum
# product, the folded-heads product, the cast); every style runs under -m slow
BACKEND_FAST = ["mha_batch_first", "x_transformers", "baddbmm_flat", "float_upcast"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _assert_exact_on_real_rows(got, want, rows):
    got, want = _first(got), _first(want)
    if rows is not None:
        got, want = got[rows], want[rows]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", REWRITTEN)
def test_offline_rewrite_finds_the_attention_and_is_exact_with_a_covering_window(style):
    model, args, rows = styles.build(style)
    fast, report = rl.rewrite(model, args, EXACT, progress=False)
    assert report.counts == {"linear_attention": 1}, report.skipped
    with torch.no_grad():
        _assert_exact_on_real_rows(fast(*args), model(*args), rows)


@pytest.mark.parametrize("style", [s if s in BACKEND_FAST else pytest.param(s, marks=pytest.mark.slow)
                                   for s in REWRITTEN])
def test_compile_backend_finds_the_same_attention(style):
    model, args, rows = styles.build(style)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=rl.backend(EXACT), dynamic=False)
    with torch.no_grad():
        got = compiled(*args)
        _assert_exact_on_real_rows(got, model(*args), rows)
    assert rl.last_report().counts == {"linear_attention": 1}, rl.last_report().skipped


@pytest.mark.parametrize("front_end", ["rewrite", "backend"])
def test_returned_attention_weights_are_left_alone_by_both_front_ends(front_end):
    _, args, _ = styles.build("timm")
    model = styles.ReturnsWeights(batch_first=True, need_weights=True).eval()
    if front_end == "rewrite":
        fast, report = rl.rewrite(model, args, EXACT, progress=False)
    else:
        torch._dynamo.reset()
        fast = torch.compile(model, backend=rl.backend(EXACT), dynamic=False)
        fast(*args)
        report = rl.last_report()
    assert report.counts == {}
    assert [why for _, _, why in report.skipped] == ["intermediate softmax is also used elsewhere"]
    with torch.no_grad():
        for got, want in zip(fast(*args), model(*args), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_fill_and_keep_masks_are_not_summed():
    """A masked_fill (True = drop) under a where (True = keep) cannot be one mask of one kind: no match."""

    class Mixed(torch.nn.Module):
        def forward(self, q, k, v, drop, keep):
            s = (q @ k.transpose(-2, -1)).masked_fill(drop, float("-inf"))
            return torch.where(keep, s, torch.full_like(s, -1e9)).softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    drop = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    keep = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    _, report = rl.rewrite(Mixed(), (q, k, v, drop, keep), EXACT, progress=False)
    assert report.counts == {}


def test_a_fill_that_does_not_drop_is_not_a_mask():
    """masked_fill with 0 keeps the key with a changed score: not a padding mask, not attention to rewrite."""

    class ZeroFill(torch.nn.Module):
        def forward(self, q, k, v, m):
            return (q @ k.transpose(-2, -1)).masked_fill(m, 0.0).softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    m = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    m[..., -1] = True
    _, report = rl.rewrite(ZeroFill(), (q, k, v, m), EXACT, progress=False)
    assert report.counts == {}


def test_falcon_dense_layers_written_x_at_weight_T_are_found():
    """Falcon writes `x @ self.weight.T` (aten.numpy_T in torch.export graphs): every one is a dense layer."""
    from tests.model_zoo import make_model

    model = make_model("falcon", "eager")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    full_rank = min(model.config.hidden_size, 4 * model.config.hidden_size)
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LowRank(rank=full_rank)]), progress=False)
    assert report.counts == {"low_rank": 4 * model.config.num_hidden_layers}, report.skipped
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-4, atol=1e-4)


def _skip_reasons(model, args):
    _, report = rl.rewrite(model, args, EXACT, progress=False)
    assert report.counts == {}
    return [why for _, _, why in report.skipped]


def test_softcapped_scores_are_left_alone_with_the_reason():
    class Softcap(torch.nn.Module):  # Gemma2: cap * tanh(scores / cap)
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) * 0.3
            return torch.softmax(torch.tanh(s / 50.0) * 50.0, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert _skip_reasons(Softcap(), (q, k, v)) == [
        "not rewritten: logit softcapping (tanh of the scores) changes every weight; linear attention cannot be exact"]


def test_disentangled_scores_are_left_alone_with_the_reason_even_when_heads_are_folded():
    class Disentangled(torch.nn.Module):  # DeBERTa: content-to-position scores gathered by relative distance
        def forward(self, q, k, v, pos, index):
            s = q @ k.transpose(-2, -1) + torch.gather(q @ pos.transpose(-2, -1), -1, index)
            p = s.softmax(-1).view(-1, 5, 5)
            return torch.bmm(p, v.reshape(-1, 5, 8))  # kept flat: no folded product to take

    q, k, v, pos = (torch.randn(1, 2, 5, 8) for _ in range(4))
    index = torch.randint(0, 5, (1, 2, 5, 5))
    (reason,) = _skip_reasons(Disentangled(), (q, k, v, pos, index))
    assert "disentangled" in reason


def test_scores_that_are_not_q_k_products_are_left_alone_naming_their_ops():
    class Distance(torch.nn.Module):  # softmax over negative distances: attention-shaped, not q @ k^T
        def forward(self, q, k, v):
            return torch.softmax(-torch.cdist(q, k), dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    (reason,) = _skip_reasons(Distance(), (q, k, v))
    assert reason.startswith("not rewritten: the softmax scores are not q @ k^T") and "cdist" in reason


def test_mha_expansion_holds_at_a_second_length():
    """The backend's expansion of nn.MultiheadAttention reads its sizes from its inputs: a recompile at another
    length (dynamic sizes) still finds the attention and stays exact."""
    recipe = rl.Recipe([rl.LinearAttention(window=64)])
    torch._dynamo.reset()
    model = styles.TorchMHA(batch_first=False, need_weights=False, causal=False).eval()
    compiled = torch.compile(model, backend=rl.backend(recipe))
    for t in (10, 13):
        x = torch.randn(2, t, styles.C, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert rl.last_report().counts == {"linear_attention": 1}


def test_two_fill_masks_export_to_onnx(tmp_path):
    """Drop masks are or-ed in the rewritten graph: ONNX has no Add on booleans (the file was invalid)."""
    from relinear.export import ort as ort_io
    from relinear.export import to_onnx

    model, args, rows = styles.build("two_masked_fills")
    to_onnx(model, args, tmp_path / "m.onnx", EXACT)
    session = ort_io.make_session(tmp_path / "m.onnx", threads=1)
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got)[rows], model(*args)[rows], rtol=1e-5, atol=1e-5)
