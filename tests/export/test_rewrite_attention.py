"""`rewrite_onnx` on softmax attention: every exporter spelling is found, and the rewritten file computes
linear attention exactly as the plain-torch reference does (feature maps on q and k times sqrt(scale))."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.kernels.linear_attention.reference import linear_attention_reference
from relinear.recipe import LinearAttention, Recipe

HEADS, HEAD_DIM, WIDTH = 2, 4, 8


class TinyAttention(torch.nn.Module):
    """One attention layer over an additive padding (and optionally causal) mask, in two spellings:
    SDPA (decomposed by the exporter) or eager matmul / divide / softmax / matmul."""

    def __init__(self, causal: bool, sdpa: bool):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.causal, self.sdpa = causal, sdpa

    def heads(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return [t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (q, k, v)]

    def additive_mask(self, attention_mask):
        length = attention_mask.shape[-1]
        visible = attention_mask[:, None, None, :].bool()
        if self.causal:
            visible = visible & torch.ones(length, length, dtype=torch.bool).tril()
        return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)

    def forward(self, x, attention_mask):
        q, k, v = self.heads(x)
        mask = self.additive_mask(attention_mask)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + mask
        return scores.softmax(-1) @ v

    def linear_reference(self, x, attention_mask, feature_map):
        q, k, v = self.heads(x)
        root = HEAD_DIM ** -0.25
        return linear_attention_reference(feature_map(q * root), feature_map(k * root), v,
                                          attention_mask.bool(), self.causal)


def _export(module, path, dynamo: bool):
    x, mask = torch.randn(2, 6, WIDTH), torch.ones(2, 6, dtype=torch.long)
    if dynamo:
        torch.onnx.export(module, (x, mask), path, dynamo=True, external_data=False, verbose=False,
                          input_names=["x", "attention_mask"],
                          dynamic_shapes=({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}))
    else:
        torch.onnx.export(module, (x, mask), path, dynamo=False, opset_version=17,
                          input_names=["x", "attention_mask"],
                          dynamic_axes={"x": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})


def _run(path, x, mask):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy(), "attention_mask": mask.numpy()})[0])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_becomes_reference_linear_attention(tmp_path, dynamo, sdpa, causal):
    module = TinyAttention(causal, sdpa).eval()
    _export(module, tmp_path / "in.onnx", dynamo)
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", Recipe([LinearAttention(feature_map="elu")]))
    assert report.counts == {"linear_attention": 1}
    assert report.sites[0].detail.endswith("causal" if causal else "bidirectional")
    # a length that is no multiple of the chunk size, and a padded row
    x, mask = torch.randn(2, 70, WIDTH), torch.ones(2, 70, dtype=torch.long)
    mask[1, 50:] = 0
    expected = module.linear_reference(x, mask, lambda t: F.elu(t) + 1)
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x, mask), expected, atol=2e-5, rtol=1e-4)
        assert not np.allclose(_run(tmp_path / "in.onnx", x, mask), expected, atol=1e-3)


def test_relu_feature_map(tmp_path):
    module = TinyAttention(True, True).eval()
    _export(module, tmp_path / "in.onnx", True)
    rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", Recipe([LinearAttention(feature_map="relu")]))
    x, mask = torch.randn(2, 9, WIDTH), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        expected = module.linear_reference(x, mask, F.relu)
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x, mask), expected, atol=2e-5, rtol=1e-4)


def test_unsupported_feature_map_and_window_are_skipped_with_reason(tmp_path):
    _export(TinyAttention(False, True).eval(), tmp_path / "in.onnx", True)
    recipe = Recipe([LinearAttention(feature_map="hedgehog"), LinearAttention(feature_map="elu", window=4)])
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", recipe)
    assert report.counts == {}
    reasons = " ".join(reason for _, _, reason in report.skipped)
    assert "hedgehog" in reasons and "window" in reasons


def test_where_glob_selects_by_module_path(tmp_path):
    _export(TinyAttention(False, False).eval(), tmp_path / "in.onnx", True)
    def rewritten(where, name):
        return rewrite_onnx(tmp_path / "in.onnx", tmp_path / name,
                            Recipe([LinearAttention(feature_map="elu", where=where)])).counts

    assert rewritten("*mlp*", "a.onnx") == {}
    assert rewritten("*", "b.onnx") == {"linear_attention": 1}


@pytest.mark.parametrize("chunk_size", [None, 7], ids=["device-default", "chosen"])
def test_causal_chunk_size_changes_only_rounding(tmp_path, chunk_size):
    # None resolves to the CPU default; a chosen size that divides no length here must give the same output
    module = TinyAttention(True, True).eval()
    _export(module, tmp_path / "in.onnx", True)
    recipe = Recipe([LinearAttention(feature_map="elu", chunk_size=chunk_size)])
    rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", recipe)
    x, mask = torch.randn(2, 45, WIDTH), torch.ones(2, 45, dtype=torch.long)
    with torch.no_grad():
        expected = module.linear_reference(x, mask, lambda t: F.elu(t) + 1)
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x, mask), expected, atol=2e-5, rtol=1e-4)


class WindowedAttention(TinyAttention):
    """Causal attention within a sliding window of 3 keys: not key padding + causal once T > 3."""

    def additive_mask(self, attention_mask):
        length = attention_mask.shape[-1]
        visible = attention_mask[:, None, None, :].bool()
        band = torch.ones(length, length, dtype=torch.bool).tril() & ~torch.ones(length, length, dtype=torch.bool
                                                                                 ).tril(-3)
        return torch.zeros(visible.shape).masked_fill(~(visible & band), torch.finfo(torch.float32).min)


@pytest.mark.parametrize("dynamo", [True, False])
def test_a_mask_that_is_not_key_padding_gives_nan_not_a_wrong_value(tmp_path, dynamo):
    """A file has no example inputs to prove the mask from: the rewritten file checks it at every run, and a
    sliding window (or any other pattern) makes the output NaN (ONNX cannot raise)."""
    module = WindowedAttention(causal=True, sdpa=False)
    _export(module, tmp_path / "in.onnx", dynamo)
    report = rewrite_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", Recipe([LinearAttention(feature_map="elu")]))
    assert report.counts.get("linear_attention") == 1
    x, mask = torch.randn(2, 9, WIDTH), torch.ones(2, 9, dtype=torch.long)
    assert torch.isnan(_run(tmp_path / "out.onnx", x, mask)).all()
    with torch.no_grad():  # at or below the window the mask is causal + padding: the rewrite computes its answer
        x3, mask3 = x[:, :3], mask[:, :3]
        expected = module.linear_reference(x3, mask3, lambda t: F.elu(t) + 1)
        torch.testing.assert_close(_run(tmp_path / "out.onnx", x3, mask3), expected, atol=2e-5, rtol=1e-4)
