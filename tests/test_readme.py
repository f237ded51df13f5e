"""The README's Python API section runs as written: its code blocks are executed in order.

A snippet that goes stale (a renamed argument, an undefined name, a wrong result) fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def api_blocks() -> list[str]:
    """The ```python blocks of the '## The Python API' section, in order."""
    text = README.read_text()
    start = text.index("## The Python API")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_readme_api_section_runs(capsys):
    blocks = api_blocks()
    assert len(blocks) >= 2 and "prune_one_shot" in blocks[0] and "register_op" in blocks[1]
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    result = namespace["result"]
    assert 0.2 < result.flops_after / result.flops_before < 0.8
    assert namespace["small"].get_submodule("3").w.shape == (6,)
    assert "hard_flops_ratio" in capsys.readouterr().out
