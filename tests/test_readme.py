"""The README's Python examples: they parse, and what they import from `app` exists.

ruff formats these blocks (scripts/test.sh) but skips, silently, one it cannot
parse; and a renamed function would leave an example that no longer runs.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[int, str]]:
    """Each ```python block with the README line it starts on."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_the_readme_has_python_examples() -> None:
    assert len(examples()) >= 3


@pytest.mark.parametrize(
    ("line", "source"), [pytest.param(*e, id=f"line-{e[0]}") for e in examples()]
)
def test_a_readme_example_parses_and_imports_what_exists(line: int, source: str) -> None:
    # The examples await at the top level, as in `python -m asyncio`.
    tree = compile(
        source,
        f"README.md:{line}",
        "exec",
        flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "app":
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), (
                    f"README.md:{line} imports {alias.name} from {node.module}, which has none"
                )
