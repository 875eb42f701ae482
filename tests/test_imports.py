"""The package's modules import each other without a circle (module-level and function-level imports alike)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nacd"


def import_graph() -> dict[str, set[str]]:
    """Module -> the nacd modules it imports anywhere in its body."""
    graph = {}
    for path in sorted(SRC.glob("*.py")):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nacd"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from nacd import a, b
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nacd."))
        graph[name] = {d for d in deps if d != name and (SRC / f"{d}.py").is_file()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "distill" in graph and "tm" in graph["distill"]  # the graph is read
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
