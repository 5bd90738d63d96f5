"""docs/coverage.md says what relinear finds and rewrites on each architecture and attention style: these tests
hold the project to it. A fast subset (rewrite and exactness columns) runs in CI; every row and column under
`pytest -m slow`. Regenerate the table with `python benchmarks/coverage.py` when a change moves a row."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import coverage  # noqa: E402  (benchmarks/coverage.py)

TEXT = (ROOT / "docs" / "coverage.md").read_text()
TABLE = coverage.read_table(TEXT)
CASES = {name: (build, inputs) for name, build, inputs in coverage.all_cases()}
FAST = ["bert/sdpa", "deberta_v2/eager", "x_transformers", "baddbmm_flat", "mha_need_weights"]  # rewritten; left alone


def _check(name, **columns):
    build, inputs = CASES[name]
    got = coverage.claims(coverage.run_case(name, build(), inputs, **columns))
    want = dict(TABLE[name])
    if not columns.get("backend", True):
        want.update(backend=[], backend_rewritten=[])
    if not columns.get("onnx", True):
        want["onnx"] = ""
    assert got == want


def test_the_table_has_a_row_for_every_case_or_says_it_was_not_run():
    assert set(TABLE) | set(coverage.rows_not_run(TEXT)) == set(CASES)
    assert not set(TABLE) & set(coverage.rows_not_run(TEXT))


def test_every_softmax_attention_is_found_rewritten_or_left_alone_with_a_reason():
    """Zero unreported sites: a row whose sites found fall short of its attention modules must say why here."""
    short = {name: (c["found"], c["modules"]) for name, c in TABLE.items() if c["found"] < c["modules"]}
    assert short == {}


@pytest.mark.parametrize("name", FAST)
def test_fast_rows_match_the_table(name):
    _check(name, backend=False, onnx=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_row_matches_the_table(name):
    if name not in TABLE:
        pytest.skip(f"{name}: docs/coverage.md says it was not run; regenerate the table (benchmarks/coverage.py)")
    _check(name)
