"""The quality benchmark runs end to end (a few steps on short windows) and records what its README row and
per-head diagnosis are read from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_minilm_quality_smoke(tmp_path):
    out = tmp_path / "minilm.json"
    subprocess.run(
        [sys.executable, "benchmarks/minilm_quality.py", "--steps", "2", "--distill-steps", "3", "--stages", "2",
         "--length", "32", "--eval", "2", "--recipes", "hedgehog+window3+sink", "hedgehog", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/minilm_quality.py")
    assert [row["recipe"] for row in result["rows"]] == ["hedgehog+window3+sink", "hedgehog"]
    for row in result["rows"]:
        assert row["rewrites"] == 6  # all-MiniLM-L6-v2: one attention per layer
        for key in ("cosine_before", "cosine_transfer", "cosine_after"):
            assert -1.0 <= row[key] <= 1.0 + 1e-6
        # two stages of 2 and 1 steps, each followed by the held-out cosine; the last one is the final figure
        during = row["cosine_during_distillation"]
        assert [steps for steps, _ in during] == [2, 3]
        assert during[-1][1] == pytest.approx(row["cosine_after"], abs=1e-6)
        heads = row["heads_after_transfer"]
        assert heads["heads"] == 6 * 12
        assert 0 <= heads["local_heads"] <= heads["heads"]
        assert -1.0 <= heads["pearson_error_local_mass"] <= 1.0


def test_minilm_balance_smoke(tmp_path):
    out = tmp_path / "balance.json"
    subprocess.run(
        [sys.executable, "benchmarks/minilm_balance.py", "--steps", "2", "--length", "32", "--window", "4",
         "--eval", "2", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6  # one per MiniLM layer
    for row in rows:
        # a least-squares fit with a per-head intercept never leaves more spread than the per-head mean does
        assert row["log_factor_std_after_fit"] <= row["log_factor_std"] + 1e-6
        assert all(0 <= row[key] < float("inf") for key in ("error_gate", "error_fitted", "error_ideal"))


def test_minilm_sparse_quality_smoke(tmp_path):
    out = tmp_path / "sparse.json"
    subprocess.run(
        [sys.executable, "benchmarks/minilm_sparse_quality.py", "--length", "32", "--eval", "2", "--calibration", "1",
         "--batch", "2", "--budgets", "0.25", "--recipes", "low-rank plain", "low-rank whitened",
         "--distill-steps", "2", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["distill_steps"] == 2 and result["distill_lr"] > 0
    assert [row["recipe"] for row in result["rows"]] == ["low-rank plain", "low-rank whitened"]
    for row in result["rows"]:
        assert row["rewrites"] == 12  # the two MLP weights of each of MiniLM's 6 layers
        assert -1.0 <= row["cosine"] <= 1.0 + 1e-6 and -1.0 <= row["cosine_distilled"] <= 1.0 + 1e-6
    # the goal is read from the rows: whitened >= plain, before and after distillation
    plain, whitened = result["rows"]
    for column, goals in (("cosine", "goals_before"), ("cosine_distilled", "goals_distilled")):
        assert result[goals] == {"25% low-rank whitened >= plain": whitened[column] >= plain[column]}
