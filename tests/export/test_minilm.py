"""`rewrite_onnx` on the real MiniLM, as exported by both exporters: it finds every attention and dense layer,
an exactly representable rewrite reproduces the original outputs, and the input file is never touched."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest

from relinear.export import ort
from relinear.export.model_io import REPORT_KEY
from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.recipe import LinearAttention, LowRank, Recipe

# Every MiniLM weight has 384 as its smaller side, so rank 384 keeps it exactly.
FULL_RANK = LowRank(rank=384)


def _digest(path: str) -> str:
    files = [path] + ([path + ".data"] if os.path.exists(path + ".data") else [])
    return hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()


def _inputs(batch=2, length=24):
    rng = np.random.default_rng(0)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[-1, length // 2 :] = 0
    return {"input_ids": rng.integers(100, 20000, (batch, length)), "attention_mask": mask}


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_exact_rewrite_finds_every_layer_and_reproduces_outputs(minilm_onnx, tmp_path, exporter):
    src, dst = minilm_onnx[exporter], str(tmp_path / "low_rank.onnx")
    before = _digest(src)
    report = rewrite_onnx(src, dst, Recipe([FULL_RANK]))
    assert _digest(src) == before
    assert report.counts == {"low_rank": 37}, report.skipped
    for stats in ort.compare(src, dst, _inputs()):
        assert stats.max_abs < 1e-4, stats
    written, original = onnx.load(dst, load_external_data=False), onnx.load(src, load_external_data=False)
    assert written.ir_version == original.ir_version
    assert {(o.domain, o.version) for o in written.opset_import} >= {(o.domain, o.version)
                                                                     for o in original.opset_import}
    assert os.path.exists(dst + ".data") == os.path.exists(src + ".data")
    stored = json.loads({p.key: p.value for p in written.metadata_props}[REPORT_KEY])
    assert stored["counts"] == {"low_rank": 37}
    onnx.checker.check_model(dst, full_check=True)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_linear_attention_finds_six_subgraphs(minilm_onnx, tmp_path, exporter):
    src, dst = minilm_onnx[exporter], str(tmp_path / "linear.onnx")
    report = rewrite_onnx(src, dst, Recipe([LinearAttention(feature_map="elu")]))
    assert report.counts == {"linear_attention": 6}
    assert all(s.detail == "elu, bidirectional" for s in report.sites)
    assert len({s.where for s in report.sites}) == 6
    out = ort.run(ort.make_session(dst), _inputs())
    assert all(np.isfinite(v).all() for v in out.values())
    assert "Softmax" not in {n.op_type for n in onnx.load(dst, load_external_data=False).graph.node}
