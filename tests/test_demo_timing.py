"""The demo's speed-up figure: interleaved samples and their median, on a fake clock (no timed tests)."""

from __future__ import annotations

import pytest

from relinear.demo import interleaved_ms


def test_interleaved_ms_samples_round_robin_and_takes_the_median():
    now = [0.0]
    calls = []

    def model(name, costs):
        def run(_x):
            calls.append(name)
            now[0] += costs.pop(0)

        return run

    # a warm-up call each (cost ignored), then rounds a, b, a, b, a, b
    models = {"a": model("a", [9.0, 0.010, 0.030, 0.020]), "b": model("b", [9.0, 0.001, 0.005, 0.003])}
    ms = interleaved_ms(models, (None,), rounds=3, clock=lambda: now[0])
    assert calls == ["a", "b"] * 4
    assert ms == pytest.approx({"a": 20.0, "b": 3.0})
