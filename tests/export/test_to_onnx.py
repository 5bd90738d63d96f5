"""`to_onnx`: a model rewritten by relinear exports to standard ONNX that ORT runs at other batch sizes and
sequence lengths, and computes what the rewritten torch module computes."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from relinear.export import ort
from relinear.export.model_io import REPORT_KEY
from relinear.export.to_onnx import to_onnx
from relinear.recipe import LinearAttention, Monarch, Recipe


class Encoder(torch.nn.Module):
    """A random 2-layer BERT returning its last hidden state."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128)
        self.bert = BertModel(config).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tokens(batch, length, padded_from):
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, padded_from:] = 0
    return ids, mask


def _ort(path, ids, mask):
    session = ort.make_session(path)
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()), strict=True)))[0])


@pytest.fixture(scope="module")
def encoder():
    return Encoder().eval()


def test_rewritten_export_matches_rewritten_torch_at_new_shapes(encoder, tmp_path):
    from relinear.rewrite.offline import rewrite

    recipe = Recipe([LinearAttention(feature_map="elu"), Monarch(nblocks=4)])
    example = _tokens(2, 16, 10)
    report = to_onnx(encoder, example, tmp_path / "fast.onnx", recipe)
    assert report.counts == {"linear_attention": 2, "monarch": 13}  # 6 per layer and the pooler
    fast, _ = rewrite(encoder, example, recipe, progress=False)
    ids, mask = _tokens(3, 37, 20)
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "fast.onnx", ids, mask), fast(ids, mask), atol=1e-5, rtol=1e-4)
    model = onnx.load(tmp_path / "fast.onnx")
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # no custom-op library needed
    stored = json.loads({p.key: p.value for p in model.metadata_props}[REPORT_KEY])
    assert stored["counts"] == report.counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.onnx"]


@pytest.mark.parametrize("decay", [True, 2])
def test_calibrated_decay_exports_and_runs(encoder, tmp_path, decay):
    """A rewritten model whose decay has trained (here: set to rates of 0.2 to 2 per token, and a mix when
    there are two rates) exports as it is, bidirectional decay included, and ORT computes what torch does at
    other shapes."""
    from relinear.approx.linear_attention import LinearizedAttention
    from relinear.rewrite.offline import rewrite

    example = _tokens(2, 16, 10)
    fast, report = rewrite(encoder, example, Recipe([LinearAttention(feature_map="hedgehog", decay=decay)]),
                           progress=False)
    layers = [m for m in fast.modules() if isinstance(m, LinearizedAttention)]
    assert report.counts == {"linear_attention": 2} and len(layers) == 2
    with torch.no_grad():
        for layer in layers:
            layer.decay.copy_(torch.linspace(-0.16, 0.07, layer.decay.numel()).view(layer.decay.shape))
            if layer.decay_mix is not None:
                layer.decay_mix.copy_(torch.tensor([0.3, -0.4]))
    to_onnx(fast, example, tmp_path / "decay.onnx")
    ids, mask = _tokens(3, 29, 12)
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "decay.onnx", ids, mask), fast(ids, mask), atol=1e-5, rtol=1e-4)


def test_plain_export_without_recipe(encoder, tmp_path):
    assert to_onnx(encoder, _tokens(2, 8, 5), tmp_path / "plain.onnx") is None
    ids, mask = _tokens(1, 21, 21)
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "plain.onnx", ids, mask), encoder(ids, mask), atol=1e-5, rtol=1e-4)
