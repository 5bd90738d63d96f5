"""Timing in the decision and the report, with fake timers (no test here measures real time): a slower site
is left alone with its times as the reason, "auto" takes the fastest setting within max_error, and times are
cached on disk so that a second rewrite (or the backend) decides the same without timing again."""

from __future__ import annotations

import json

import pytest
import torch

import relinear as rl
from relinear.approx.linear_attention import LinearizedAttention
from relinear.rewrite import timing
from relinear.rewrite.timing import TimingKey, median_time


class FakeTimer:
    """Seconds by what is timed: the original, or a replacement by its setting; counts its calls."""

    def __init__(self, original: float, replacement: float | dict[str, float]):
        self.original, self.replacement = original, replacement
        self.keys: list[TimingKey] = []

    def __call__(self, key: TimingKey, run) -> float:
        self.keys.append(key)
        run()  # the subgraph must run on its example inputs
        if key.setting == "original":
            return self.original
        if isinstance(self.replacement, dict):
            return self.replacement[key.setting.split(",")[0]]
        return self.replacement


def _linear(rank: int | None = None, size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear(size, size)
    if rank is not None:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(size, rank) @ torch.randn(rank, size) / rank)
    return lin.eval()


def test_median_time_takes_the_median_of_the_repeats_after_a_warm_up():
    ticks = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])  # three timed calls: 1 s, 3 s, 2 s
    calls = []
    assert median_time(lambda: calls.append(1), repeats=3, clock=lambda: next(ticks)) == 2.0
    assert len(calls) == 4  # the warm-up is run, not timed


def test_a_slower_site_is_left_alone_with_the_measured_times_as_the_reason():
    model, x = _linear(), torch.randn(4, 32)
    timer = FakeTimer(original=1e-3, replacement=2e-3)
    with timing.settings(measure=True, timer=timer, cache=None):
        fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank=4)]), progress=False)
    assert report.counts == {}
    ((rule, where, reason),) = report.skipped
    assert rule == "low_rank" and "not faster" in reason and "1 ms -> 2 ms" in reason and "min_speedup=1" in reason
    assert not [n for n, _ in fast.named_parameters() if n.startswith("relinear")]
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)  # the original computation, untouched
    assert [k.setting for k in timer.keys] == ["original", "rank=4"]
    assert timer.keys[0].op == "linear" and timer.keys[1].op.endswith("low_rank_linear")


@pytest.mark.parametrize(("min_speedup", "applied"), [(None, True), (1.5, True), (3.0, False), (0, True)])
def test_min_speedup_is_the_ratio_a_replacement_must_reach(min_speedup, applied):
    model, x = _linear(), torch.randn(4, 32)
    with timing.settings(measure=True, timer=FakeTimer(original=2e-3, replacement=1e-3), cache=None):
        _, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank=4, min_speedup=min_speedup)]),
                               progress=False)
    assert report.counts == ({"low_rank": 1} if applied else {})
    if applied:
        (site,) = report.sites
        assert (site.time_before, site.time_after) == (2e-3, 1e-3)
        assert (report.time_before, report.time_after) == (2e-3, 1e-3)
        assert "2 ms -> 1 ms (2.00x)" in str(report)
    else:
        assert "2.00x < min_speedup=3" in report.skipped[0][2]


def test_min_speedup_zero_keeps_a_slower_site_and_still_reports_its_times():
    model, x = _linear(), torch.randn(4, 32)
    with timing.settings(measure=True, timer=FakeTimer(original=1e-3, replacement=3e-3), cache=None,
                         min_speedup=0):
        _, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank=4)]), progress=False)
    (site,) = report.sites
    assert (site.time_before, site.time_after) == (1e-3, 3e-3)


def test_auto_takes_the_fastest_setting_within_max_error_and_leaves_no_loser_behind():
    model, x = _linear(rank=8, size=64), torch.randn(16, 64)  # exactly rank 8: ranks 8..64 are within budget
    times = {"rank=8": 3e-3, "rank=16": 2.5e-3, "rank=32": 1e-3, "rank=64": 2e-3}
    timer = FakeTimer(original=5e-3, replacement=times)
    with timing.settings(measure=True, timer=timer, cache=None):
        fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank="auto", max_error=1e-4)]),
                                  progress=False)
    (site,) = report.sites
    assert site.detail == "rank=32" and site.time_after == 1e-3
    assert sorted(k.setting for k in timer.keys if k.setting != "original") == sorted(times)  # 1..4 over budget
    new = {n: p.shape for n, p in fast.named_parameters() if n.startswith("relinear")}
    assert sorted(new.values()) == sorted([torch.Size([32, 64]), torch.Size([64, 32]), torch.Size([64])])
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_auto_without_timing_takes_the_cheapest_setting_within_max_error():
    model, x = _linear(rank=8, size=64), torch.randn(16, 64)
    with timing.settings(measure=False):
        _, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(rank="auto", max_error=1e-4)]), progress=False)
    (site,) = report.sites
    assert site.detail == "rank=8" and site.time_before is None


def test_a_second_rewrite_reads_the_cache_and_decides_the_same(tmp_path):
    model, x = _linear(), torch.randn(4, 32)
    cache = tmp_path / "timings.json"
    recipe = rl.Recipe([rl.LowRank(rank=4), rl.ActivationApprox()])
    first = FakeTimer(original=2e-3, replacement=1e-3)
    with timing.settings(measure=True, timer=first, cache=str(cache)):
        _, report1 = rl.rewrite(model, (x,), recipe, progress=False)
    stored = json.loads(cache.read_text())
    assert len(first.keys) == len(stored) == 2
    assert all(timing.versions() in key and "cpu x" in key for key in stored)
    second = FakeTimer(original=1.0, replacement=9.0)  # would decide otherwise, if it were asked
    with timing.settings(measure=True, timer=second, cache=str(cache)):
        _, report2 = rl.rewrite(model, (x,), recipe, progress=False)
    assert second.keys == [] and report2.counts == report1.counts == {"low_rank": 1}
    assert report2.sites[0].time_after == 1e-3
    with timing.settings(measure=True, timer=second, cache=None):  # the cache turned off: timed again
        _, report3 = rl.rewrite(model, (x,), recipe, progress=False)
    assert len(second.keys) == 2 and report3.counts == {}


def test_the_backend_uses_the_same_cache(tmp_path):
    model, x = _linear(), torch.randn(4, 32)
    cache, recipe = str(tmp_path / "timings.json"), rl.Recipe([rl.LowRank(rank=4)])
    with timing.settings(measure=True, timer=FakeTimer(original=2e-3, replacement=1e-3), cache=cache):
        rl.rewrite(model, (x,), recipe, progress=False)
    asked = FakeTimer(original=1.0, replacement=9.0)
    torch._dynamo.reset()
    with timing.settings(measure=True, timer=asked, cache=cache), torch.no_grad():
        torch.compile(model, backend="relinear", options={"recipe": recipe})(x)
    assert asked.keys == [] and rl.last_report().counts == {"low_rank": 1}


def test_a_slower_attention_rewrite_is_taken_back_out():
    """The attention rewrite inserts its module itself; the engine times that subgraph and removes it."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    timer = FakeTimer(original=1e-3, replacement=4e-3)
    with timing.settings(measure=True, timer=timer, cache=None):
        fast, report = rl.rewrite(Attend(), (q, k, v), rl.Recipe([rl.LinearAttention(feature_map="elu")]),
                                  progress=False)
    assert report.counts == {} and "1 ms -> 4 ms (0.25x < min_speedup=1)" in report.skipped[0][2]
    assert not any(isinstance(m, LinearizedAttention) for m in fast.modules())
    torch.testing.assert_close(fast(q, k, v), Attend()(q, k, v), rtol=0, atol=0)
    assert timer.keys[0].op == "sdpa"


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RELINEAR_TIMING", "on")
    monkeypatch.setenv("RELINEAR_MIN_SPEEDUP", "1.2")
    monkeypatch.setenv("RELINEAR_TIMING_CACHE", "off")
    chosen = timing.current()
    assert chosen.measure and chosen.min_speedup == 1.2 and chosen.cache is None
    monkeypatch.setenv("RELINEAR_TIMING", "sometimes")
    with pytest.raises(ValueError, match="RELINEAR_TIMING"):
        timing.current()
    with pytest.raises(TypeError, match="repeat"):
        with timing.settings(repeat=3):
            pass


def test_min_speedup_must_be_a_non_negative_number():
    with pytest.raises(rl.RecipeError, match="min_speedup"):
        rl.LowRank(rank=2, min_speedup=-1)
    with pytest.raises(rl.RecipeError, match="min_speedup"):
        rl.Monarch(min_speedup="fast")
