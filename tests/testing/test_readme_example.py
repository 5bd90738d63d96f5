"""The README's python blocks run as written, in order, in one namespace (as a reader pastes them)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 4, "README.md lost its examples"
    monkeypatch.chdir(tmp_path)  # the examples write files (fast.onnx)
    namespace = {"__name__": "readme_example"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{README}:block{i}", "exec"), namespace)
    assert (tmp_path / "fast.onnx").stat().st_size > 0
