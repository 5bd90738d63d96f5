"""`relinear bench --quick`: the report, its plots and its JSON are written whole, and the markdown shows the
JSON's numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from relinear.bench.report import PLOTS, _pareto_front, write_report
from relinear.cli import main

FILES = {"report.md", "results.json", *PLOTS.values()}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every markdown table as rows of {header: cell}."""
    found, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True)))
            found.append(rows)
    return found


def close(cell: str, value: float) -> bool:
    return math.isclose(float(cell), value, rel_tol=1e-3)  # tables show 4 significant digits


def test_quick_bench_writes_every_file_and_nothing_else(quick_report):
    assert {p.name for p in quick_report.iterdir()} == FILES
    for name in PLOTS.values():
        assert (quick_report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in quick_report.parent.iterdir()] == ["report"]  # no temporary folder left


def test_markdown_numbers_are_the_json_numbers(quick_report):
    results = json.loads((quick_report / "results.json").read_text())
    markdown = (quick_report / "report.md").read_text()
    assert results["command"] in markdown
    seconds = results["run_seconds"]
    assert f"took {seconds['wall']:.4g} s wall clock and {seconds['cpu']:.4g} s of CPU time" in markdown
    quality, prefill, decode, errors, machine = tables(markdown)
    qs = results["quality_speed"]
    assert [r["recipe"] for r in quality] == [r["recipe"] for r in qs["rows"]]
    for shown, row in zip(quality, qs["rows"], strict=True):
        assert close(shown["held-out cosine"], row["cosine"])
        for length in qs["speed_lengths"]:
            assert close(shown[f"original ms @{length}"], row["ms"][str(length)]["original"])
            assert close(shown[f"rewritten ms @{length}"], row["ms"][str(length)]["rewritten"])
            assert close(shown[f"speed-up @{length}"], row["speedup"][str(length)])
            assert math.isclose(row["speedup"][str(length)],
                                row["ms"][str(length)]["original"] / row["ms"][str(length)]["rewritten"])
    seq = results["sequence"]
    assert len(prefill) == len(seq["prefill"]) == 3 * len(results["sizes"]["prefill_lengths"])
    for shown, row in zip(prefill, seq["prefill"], strict=True):
        assert (int(shown["length"]), shown["variant"]) == (row["length"], row["variant"])
        assert close(shown["ms"], row["ms"]) and int(shown["peak bytes"]) == row["peak_bytes"] > 0
    assert len(decode) == len(seq["decode"]) == 3 * len(results["sizes"]["decode_contexts"])
    for shown, row in zip(decode, seq["decode"], strict=True):
        assert (int(shown["context"]), shown["variant"]) == (row["context"], row["variant"])
        assert close(shown["ms per token"], row["ms_per_token"])
        assert int(shown["cache / state bytes"]) == row["cache_bytes"] > 0
    sites = [s for recipe in qs["rows"] for s in qs["per_layer_error"][recipe["recipe"]]]
    assert len(errors) == len(sites) > 0
    for shown, site in zip(errors, sites, strict=True):
        assert shown["where"] == f"`{site['where']}`" and close(shown["relative error"], site["error"])
    assert {row["what"]: row["value"] for row in machine} == {k: str(v) for k, v in results["machine"].items()}


def test_decoder_state_is_flat_while_the_kv_cache_grows(quick_report):
    decode = json.loads((quick_report / "results.json").read_text())["sequence"]["decode"]
    by_variant = {}
    for row in decode:
        by_variant.setdefault(row["variant"], []).append(row["cache_bytes"])
    assert by_variant["original"][0] < by_variant["original"][-1]
    assert len(set(by_variant["linear"])) == 1 and len(set(by_variant["hybrid"])) == 1


def test_a_failed_write_keeps_the_previous_report(quick_report, tmp_path):
    results = json.loads((quick_report / "results.json").read_text())
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("previous")

    def broken(results, path):
        path.write_bytes(b"half a plot")
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(results, out, plots={"pareto": broken})
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "previous"
    write_report(results, out, plots={})  # a successful write replaces the folder whole
    assert {p.name for p in out.iterdir()} == {"report.md", "results.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (0.5, 0.95), (0.4, 0.95)]
    assert _pareto_front(points) == [3, 0, 1]


def test_negative_calibration_steps_are_refused(capsys):
    assert main(["bench", "--quick", "--calibrate-steps", "-1"]) == 2
    assert "--calibrate-steps must be >= 0" in capsys.readouterr().err


def test_every_bench_rule_keeps_every_site_whatever_its_speed():
    from relinear.bench.suite import DECODER_VARIANTS, MINILM_RECIPES

    rules = [rule for recipe in (*MINILM_RECIPES.values(), *DECODER_VARIANTS.values()) for rule in recipe]
    assert rules and all(rule.min_speedup == 0 for rule in rules)


def test_a_rewrite_that_leaves_a_site_alone_fails_the_bench():
    import relinear as rl
    from relinear.bench.suite import _rewrite
    from relinear.rewrite import timing
    from tests.model_zoo import make_model

    model = make_model("bert", "sdpa", layers=1)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    slower = {"timer": lambda keys, runs: [1e-3 if key.setting == "original" else 2e-3 for key in keys]}
    with timing.settings(measure=True, cache=None, **slower), pytest.raises(RuntimeError, match="left sites alone"):
        _rewrite(model, ids, (rl.LinearAttention(feature_map="elu", min_speedup=1.0),))
    with timing.settings(measure=True, cache=None, **slower):  # the bench's own setting keeps the slower site
        assert _rewrite(model, ids, (rl.LinearAttention(feature_map="elu", min_speedup=0),))[1].counts == {
            "linear_attention": 1}
