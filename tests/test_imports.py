"""The module graph: every import points one way (no cycle, lazy imports included), and the
method registry is the config's list of methods."""

import ast
import re
from pathlib import Path

import petra
from petra.config import METHODS

SRC = Path(petra.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """petra modules that `path` imports anywhere in its body (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import checkpoint` names a module
                if f"{base}.{alias.name}" in modules:
                    out.add(f"{base}.{alias.name}")
                elif base in modules:
                    out.add(base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out - {name}


def test_no_import_cycle_in_petra():
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    assert graph["petra.train"] >= {"petra.methods", "petra.data"}  # the parser sees imports
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package importing its own modules
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_method_registry_is_the_configs_list():
    from petra.methods import REGISTRY

    assert tuple(REGISTRY) == METHODS


def test_the_loop_names_no_method_and_no_parallel_mode():
    """train.py asks the method and the parallel strategy; it never tests their names."""
    from petra.config import CHOICES

    src = (SRC / "train.py").read_text()
    words = [f'"{w}"' for w in (*METHODS, *CHOICES["train.parallel"][2:])] + ["method.name =="]
    assert not [w for w in words if w in src] and not re.search(r"\.mode\b", src)
