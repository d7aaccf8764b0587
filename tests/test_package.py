"""The package's shape: no import cycle among loravl's modules (read from their own imports with ast, function-level
imports included), and no module that edits sys.path."""
import ast
from pathlib import Path

import loravl

PACKAGE = Path(loravl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The loravl modules that ``path`` imports anywhere in its body (TYPE_CHECKING blocks aside)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in known and candidate != name:
                found.add(candidate)
                break
    return found


def test_no_import_cycle_among_loravl_modules():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # A package's __init__ only hands names on; importing a submodule runs it, which is no dependency of ours.
    graph = {name: imported_modules(path, set(paths)) - {n for n in paths if paths[n].name == "__init__.py"}
             for name, path in paths.items()}
    assert graph["loravl.train"] >= {"loravl.metrics", "loravl.runtime", "loravl.optim"}  # the reader works
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_sys_path_edits():
    root = PACKAGE.parents[1]
    edits = ("sys.path." + "insert", "sys.path[" + ":0]", "sys.path." + "append")  # not matching this file
    offenders = [str(p.relative_to(root)) for folder in ("src", "tests", "bench") for p in (root / folder).rglob("*.py")
                 if any(edit in p.read_text() for edit in edits)]
    assert not offenders
