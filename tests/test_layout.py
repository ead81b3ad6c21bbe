"""The package's shape: no import circles among growkern's modules, and `import growkern`
stays light (growkern.hf is reached lazily, without importing transformers before)."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "growkern"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the growkern modules its import statements name (inside functions too)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    native = {"growkern._C"}  # the compiled extension: `from .. import _C` names it, not the package
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import sub` names the submodule; `from pkg import name`, the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files.keys() | native else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert "growkern.growth.widen" in graph and graph["growkern.growth.widen"]  # the parser sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = import_graph()
    graph["growkern.growth.maps"] = graph["growkern.growth.maps"] | {"growkern.growth.widen"}
    assert any("growkern.growth.maps" in c and "growkern.growth.widen" in c for c in cycles(graph))


def test_the_growth_library_imports_no_model_harness_or_command_line():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(("growkern.growth", "growkern.kernels")):
            bad = {e for e in edges if e.startswith(("growkern.models", "growkern.train", "growkern.cli",
                                                     "growkern.studies", "growkern.hf"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_growkern_hf_is_reachable_after_import_growkern_without_importing_transformers_first():
    code = ("import sys, growkern\n"
            "assert 'transformers' not in sys.modules, 'import growkern imported transformers'\n"
            "assert 'torch.distributed.fsdp' not in sys.modules, 'import growkern imported FSDP2'\n"
            "print(growkern.hf.GrowthCallback.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "GrowthCallback"
