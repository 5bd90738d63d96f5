"""docs/generation.md's example runs as written, and the generation benchmark runs end to end (tiny sizes)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "generation.md"


def test_generation_doc_example_runs():
    block = re.search(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert block, "docs/generation.md has no ```python block"
    scope = {"__name__": "generation_doc"}
    exec(compile(block.group(1), str(DOC), "exec"), scope)
    assert scope["tokens"].shape == (2, 18)
    assert scope["decoder"].sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_generation_benchmark_smoke(tmp_path):
    out = tmp_path / "generate.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench_generate_cpu.py", "--contexts", "16", "40", "--steps", "2", "--warmup", "0",
         "--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "32", "--vocab", "50",
         "--recipes", "elu", "hedgehog+window64", "--threads", "1", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/bench_generate_cpu.py")
    assert [row["context"] for row in result["rows"]] == [16, 40]
    for row in result["rows"]:
        # fp32 K and V of 1 layer, 2 heads of 16 dims, for every token of the context
        assert row["hf_cache_bytes"] == 2 * row["context"] * 32 * 4
        assert {name: len(ms) for name, ms in row["hf_ms"].items()} == {"dynamic": 2, "static": 2}
        assert set(row["relinear"]) == {"elu", "hedgehog+window64"}
    # elu: one state [heads, F=16, Dv=16] and normalizer [heads, F] in fp32, whatever the context
    assert {row["relinear"]["elu"]["state_bytes"] for row in result["rows"]} == {2 * (16 * 16 + 16) * 4}
    assert set(result["relinear_alone"]["elu"]["ms_median"]) == {"16", "40"}
