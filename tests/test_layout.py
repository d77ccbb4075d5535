"""The package's architecture: imports point one way (no cycles), and the CLI module is wiring only."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "calibrl"


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth in the file, lazy imports included)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            # the package root only re-exports lazily; a submodule importing its own package is not a cycle
            edges[m] |= {t for t in targets if t in mods and t != m and t != "calibrl" and not m.startswith(t + ".")}
    return edges


def test_no_import_cycles_between_package_modules():
    edges = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert "calibrl.commands.train" in edges and "calibrl.config" in edges  # the walk saw the package


def test_cli_is_wiring_only():
    """cli.py imports nothing but the error types it reports (and the config help) and reaches each command
    through calibrl.commands."""
    edges = _imports()
    assert edges["calibrl.cli"] <= {"calibrl.errors", "calibrl.config", "calibrl.storage", "calibrl.checkpoints"}, \
        edges["calibrl.cli"]
    assert not any(m.startswith("calibrl.commands") and "calibrl.cli" in e for m, e in edges.items())
    assert "recipes" not in {p.stem for p in SRC.rglob("*.py")}
