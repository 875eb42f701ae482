"""The package's modules import each other without a circle (module-level and function-level imports alike)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nacd"


def module_name(path: Path, src: Path = SRC) -> str:
    """``distill`` for distill.py, ``evaluate`` for evaluate/__init__.py, ``evaluate.scoring`` for
    evaluate/scoring.py (the package's own __init__.py stays ``__init__``)."""
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the nacd modules it imports anywhere in its body, subpackages included.

    Importing ``nacd.a.b`` from outside package ``a`` runs ``a/__init__.py`` first, so it counts as
    importing ``a`` too; from inside ``a`` it does not (``a`` is being imported already then)."""
    paths = {module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
        targets: list[list[str]] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # from . import x, from .x import y
                    base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                elif node.module and node.module.split(".")[0] == "nacd":
                    base = node.module.split(".")[1:]
                else:
                    continue
                for alias in node.names:  # a submodule (from nacd.evaluate import scoring), else a name of base
                    sub = base + [alias.name]
                    targets.append(sub if ".".join(sub) in paths else base)
            elif isinstance(node, ast.Import):
                targets.extend(a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "nacd")
        deps = {
            ".".join(parts[:i])
            for parts in targets
            for i in range(1, len(parts) + 1)
            if i == len(parts) or package[:i] != parts[:i]  # the module and the packages it is entered through
        }
        graph[name] = {d for d in deps if d != name and d in paths}
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
    assert "evaluate.scoring" in graph["evaluate"] and "evaluate.prompts" in graph["evaluate.scoring"]  # and packages
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_graph_reads_packages(tmp_path):
    """A submodule is entered through its package (from outside it); a relative import is read too."""
    files = {
        "__init__.py": "",
        "user.py": "def f():\n    import nacd.pkg.sub\n",
        "pkg/__init__.py": "from nacd.pkg.sub import x\n",
        "pkg/sub.py": "from . import other\nfrom .other import y\n",
        "pkg/other.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    graph = import_graph(tmp_path)
    assert graph == {
        "__init__": set(),
        "user": {"pkg", "pkg.sub"},
        "pkg": {"pkg.sub"},
        "pkg.sub": {"pkg.other"},
        "pkg.other": set(),
    }
    assert find_cycle(graph) is None
    (tmp_path / "pkg" / "other.py").write_text("from nacd.pkg import x\n", encoding="utf-8")  # a name of pkg/__init__
    assert find_cycle(import_graph(tmp_path)) == ["pkg", "pkg.sub", "pkg.other", "pkg"]
