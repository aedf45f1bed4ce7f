"""The trainer knows heads only through the ``Head`` interface: it never asks a head what it offers."""

import ast
import pathlib

import megaclass.train

TRAIN = pathlib.Path(megaclass.train.__file__).parent


def _reflection_on_heads(source: str) -> list[int]:
    """Lines of ``getattr`` / ``hasattr`` calls whose object is a head (a name or attribute named *head*)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("getattr", "hasattr") or not node.args:
            continue
        if "head" in ast.unparse(node.args[0]):
            lines.append(node.lineno)
    return lines


def test_no_reflection_on_heads_under_train():
    found = {
        path.name: lines
        for path in sorted(TRAIN.rglob("*.py"))
        if (lines := _reflection_on_heads(path.read_text(encoding="utf-8")))
    }
    assert not found, f"getattr/hasattr on a head in megaclass.train: {found}"


def test_the_scan_sees_reflection():
    assert _reflection_on_heads("bind = getattr(self.head, 'bind_optimizer', None)") == [1]
    assert _reflection_on_heads("ok = hasattr(head, 'state_layout')") == [1]
    assert _reflection_on_heads("lr = getattr(self.config.optim, name)") == []
