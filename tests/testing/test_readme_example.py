"""The README's "Your own rules" example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Your own rules"


def readme_example(text: str) -> str:
    """The first python block between the heading and the next heading of the same level."""
    start = text.find(f"\n{HEADING}\n")
    assert start >= 0, f"README.md has no {HEADING!r} section"
    section = text[start + len(HEADING) + 2:]
    following = re.search(r"^## ", section, flags=re.MULTILINE)
    section = section[:following.start()] if following else section
    block = re.search(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert block, f"README.md's {HEADING!r} section has no ```python block"
    return block.group(1)


def test_readme_own_rules_example_runs():
    code = readme_example(README.read_text())
    exec(compile(code, f"{README}:{HEADING}", "exec"), {"__name__": "readme_example"})
