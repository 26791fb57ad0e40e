"""Size budgets from CONTRIBUTING.md, checked over the package source: files ≤ 400 lines, functions ≤ 60 lines.

A file or function over budget is a sign that two capabilities share one home; split it where it reads better.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glm45_train"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def over_budget(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            found.append(f"{path.relative_to(root.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_files_and_functions_stay_within_budget():
    assert over_budget(PACKAGE) == []


def test_the_budget_check_sees_a_long_function(tmp_path):
    """Negative control: a planted 61-line function and a 401-line file are both reported."""
    (tmp_path / "pkg").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    (tmp_path / "pkg" / "long.py").write_text("def planted():\n" + body + "\n" * 340)
    assert over_budget(tmp_path / "pkg") == ["pkg/long.py: 401 lines", "pkg/long.py:1 planted: 61 lines"]
