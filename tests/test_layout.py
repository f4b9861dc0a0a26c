"""The package's shape, checked: no import cycles, the artifact layer imports nothing above it,
backend packages are imported only by backends, and our own modules are imported inside functions
only where that defers a heavy import (torch or a runtime)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gemma_export", "calibration")
HEAVY = {"torch", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao", "litert_torch", "ai_edge_litert",
         "ai_edge_quantizer", "transformers", "matplotlib", "tokenizers", "gguf", "safetensors", "onnxruntime_genai",
         "litert_lm", "litert_lm_builder"}
RUNTIMES = HEAVY - {"torch", "transformers", "matplotlib", "tokenizers", "gguf", "safetensors"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def _resolve(name: str, module: str, path: Path, level: int) -> str:
    if not level:
        return name
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - level + 1]
    return ".".join([*base, name] if name else base)


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at top level) for every import statement of a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", module, path, node.level)
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, id(node) in top))
    return out


def ours(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    return {m: {t for name, _ in imports(m) if (t := ours(name)) and t != m} for m in MODULES}


def test_the_import_graph_has_no_cycles():
    g, index, low, stack, on, cycles = graph(), {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_artifact_layer_imports_nothing_above_it():
    assert graph()["gemma_export.artifact"] <= {"gemma_export.errors"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_runtime_and_exporter_packages_are_imported_only_by_backends(module):
    if module.startswith("gemma_export.backends") or module == "gemma_export.gemma3.reference":
        return
    used = {name.split(".")[0] for name, _ in imports(module)} & RUNTIMES
    assert not used, f"{module} imports {sorted(used)}"


def _heavy_at_import(module: str, seen=None) -> bool:
    seen = seen if seen is not None else set()
    if module in seen:
        return False
    seen.add(module)
    for name, top in imports(module):
        if not top:
            continue
        if name.split(".")[0] in HEAVY:
            return True
        target = ours(name)
        if target and target != module and _heavy_at_import(target, seen):
            return True
    return False


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_level_imports_of_our_modules_only_defer_heavy_ones(module):
    light = [name for name, top in imports(module)
             if not top and (t := ours(name)) and t != module and not _heavy_at_import(t)]
    assert not light, f"{module} imports {light} inside a function (no heavy import to defer)"


def test_the_benchmarks_import_what_exists():
    """benchmarks/ is not imported by the suite; its imports of the package must still resolve."""
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gemma_export"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                        f"{path.name}: {node.module}.{alias.name}"
