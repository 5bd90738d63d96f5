"""ORT helpers (random inputs, error statistics) and the file handling under every rewrite: atomic writes,
fused-attention detection, external data kept."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from relinear.export import model_io, ort
from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.recipe import LinearAttention, LowRank, Recipe


def _model(path, weight: np.ndarray, *, extra_nodes=(), opsets=(("", 17),)):
    """y = x @ weight over a dynamic batch, with int64 ids and a mask input that exercise random_inputs."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]]),
              helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]]),
               helper.make_tensor_value_info("ids_sum", TensorProto.INT64, []),
               helper.make_tensor_value_info("mask_min", TensorProto.INT64, [])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="dense"),
             helper.make_node("ReduceSum", ["input_ids"], ["ids_sum"], keepdims=0),
             helper.make_node("ReduceMin", ["attention_mask"], ["mask_min"], keepdims=0), *extra_nodes]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=8)
    onnx.save(model, path)
    return path


def test_random_inputs_respect_types_and_safe_ranges(tmp_path):
    session = ort.make_session(_model(tmp_path / "m.onnx", np.ones((3, 2), np.float32)))
    inputs = ort.random_inputs(session, batch=4, sequence=7)
    assert inputs["x"].shape == (4, 3) and inputs["x"].dtype == np.float32
    assert inputs["input_ids"].shape == (4, 7) and 0 <= inputs["input_ids"].min()
    assert inputs["input_ids"].max() < ort.SAFE_INT_HIGH
    assert (inputs["attention_mask"] == 1).all()


def test_output_error_statistics_against_numpy():
    a = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    b = a + np.array([[0.5, 0.0], [0.0, -1.0]], np.float32)
    stats = ort.output_error("y", a, b)
    assert stats.max_abs == pytest.approx(1.0)
    assert stats.mean_abs == pytest.approx(1.5 / 4)
    assert stats.relative_rms == pytest.approx(np.sqrt(1.25) / np.sqrt(30.0))
    with pytest.raises(ValueError, match="'y'"):
        ort.output_error("y", a, b[:1])


def test_compare_finds_the_rank_one_error(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    src = _model(tmp_path / "m.onnx", weight)
    rewrite_onnx(src, tmp_path / "r.onnx", Recipe([LowRank(rank=1)]))
    inputs = ort.random_inputs(ort.make_session(src), seed=3)
    stats = {s.name: s for s in ort.compare(src, tmp_path / "r.onnx", inputs)}
    u, s, vt = np.linalg.svd(weight.astype(np.float64))
    best_rank1 = s[0] * np.outer(u[:, 0], vt[0])
    expected = inputs["x"].astype(np.float64) @ best_rank1
    exact = inputs["x"].astype(np.float64) @ weight
    assert stats["y"].relative_rms == pytest.approx(np.linalg.norm(expected - exact) / np.linalg.norm(exact),
                                                    rel=1e-4)
    assert stats["ids_sum"].max_abs == 0 and stats["mask_min"].max_abs == 0


def test_fused_attention_is_reported_not_rewritten(tmp_path):
    fused = helper.make_node("MultiHeadAttention", ["y", "y", "y"], ["unused"], domain="com.microsoft",
                             name="fused_mha", num_heads=1)
    src = _model(tmp_path / "m.onnx", np.ones((3, 2), np.float32), extra_nodes=[fused],
                 opsets=(("", 17), ("com.microsoft", 1)))
    report = rewrite_onnx(src, tmp_path / "r.onnx", Recipe([LinearAttention(feature_map="elu")]))
    assert report.counts == {}
    assert report.skipped == [("detect", "fused_mha", "fused com.microsoft::MultiHeadAttention: not rewritten")]


def test_external_data_stays_external(tmp_path):
    src = tmp_path / "m.onnx"
    model = onnx.load(_model(src, np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)))
    onnx.save(model, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    rewrite_onnx(src, tmp_path / "r.onnx", Recipe([LowRank(rank=4)]))
    assert (tmp_path / "r.onnx.data").exists()
    assert model_io.uses_external_data(model_io.load_model(tmp_path / "r.onnx"))
    stats = ort.compare(src, tmp_path / "r.onnx")
    assert stats[0].relative_rms > 0 and np.isfinite(stats[0].relative_rms)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = _model(tmp_path / "m.onnx", np.ones((3, 2), np.float32))

    def broken(path):
        raise ValueError("relinear wrote an invalid model (simulated); nothing was saved")

    monkeypatch.setattr(model_io, "check_written", broken)
    with pytest.raises(ValueError, match="nothing was saved"):
        rewrite_onnx(src, tmp_path / "r.onnx", Recipe([LowRank(rank=1)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_compare_names_an_input_the_other_model_lacks(tmp_path):
    a = _model(tmp_path / "a.onnx", np.ones((3, 2), np.float32))
    model = onnx.load(a)
    model.graph.input[0].name = "features"
    model.graph.node[0].input[0] = "features"
    onnx.save(model, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="'features'"):
        ort.compare(a, tmp_path / "b.onnx")
