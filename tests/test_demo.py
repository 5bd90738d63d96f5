"""`relinear demo` end to end on the real MiniLM, at small sizes: the three parts a user reads (report and
speed-up at MiniLM's length, quality before/after calibration, speed-up at a long length) all print."""

from __future__ import annotations

import re

import pytest
import torch
from rich.console import Console

import relinear as rl
from relinear import demo


def test_the_demo_prints_its_three_parts(minilm):
    console = Console(record=True, width=200)
    assert demo.run(console, calibration_steps=2, long_length=256, short_windows=2) == 0
    text = console.export_text()
    # the suite runs without timing (conftest), so every site whose error fits is rewritten and timed end to end
    speedups = [float(x) for x in re.findall(r"([0-9.]+)x speed-up", text)]
    assert len(speedups) == 2 and all(s > 0 for s in speedups)
    assert "forward of 2 x 128 tokens" in text and "forward of 1 x 256 tokens" in text
    before, after = (float(x) for x in re.search(r"([0-9.]+) before calibration, ([0-9.]+) after", text).groups())
    assert 0.5 < before <= 1.0 and 0.5 < after <= 1.0
    assert "rewritten: 6 linear_attention, 6 activation_approx" in text


def test_no_speed_up_is_claimed_when_nothing_was_rewritten():
    console = Console(record=True, width=200)
    called = []
    ids = torch.zeros(2, 8, dtype=torch.long)
    demo._speed_line(console, rl.RewriteReport(), {"original": called.append, "rewritten": called.append},
                     (ids,), rounds=3)
    assert not called
    assert "none was rewritten" in console.export_text() and "speed-up" not in console.export_text()


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
    ms = demo.interleaved_ms(models, (None,), rounds=3, clock=lambda: now[0])
    assert calls == ["a", "b"] * 4
    assert ms == pytest.approx({"a": 20.0, "b": 3.0})
