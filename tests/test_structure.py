"""The package's shape, checked from its source (ast), so it stays the shape DESIGN.md and the README describe:
imports follow the layer order and form no cycle, files and functions stay readable in one sitting, and no code
outside adapters/ branches on an adapter method's name."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "adapterkit"

# Top to bottom. A module may import its own unit (adapterkit.X and everything under it) and any unit of a LOWER
# band; never a peer in its own band, never a higher band. The README's "Where things go" states the same order.
LAYERS = [
    ("adapterkit", "adapterkit.__main__"),  # the facade: lazy re-exports of the public API
    ("adapterkit.cli",),
    ("adapterkit.cli_options",),  # click options several commands share
    ("adapterkit.demo",),
    ("adapterkit.testing",),  # factories for tests/ and bench/: builds adapters, merges features
    ("adapterkit.serve", "adapterkit.train", "adapterkit.merge", "adapterkit.eval", "adapterkit.edit", "adapterkit.adopt"),
    ("adapterkit.adapters",),
    ("adapterkit.base",),
    ("adapterkit.tiny",),  # builds builtin:tiny-random for base.py
    ("adapterkit.data",),
    ("adapterkit.inference", "adapterkit.fileio", "adapterkit.devices"),
    ("adapterkit.errors", "adapterkit.faults", "adapterkit.compat", "adapterkit.lazy", "adapterkit.threads"),
]
BAND = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
SIZE_EXEMPT: set[str] = set()  # files allowed past the bounds, by path under adapterkit/ (none: demo/tasks.py was split)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Modules of the package that `name` imports anywhere (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import adapterkit.merge.features` -> that module
                target = target.rpartition(".")[0]
            if target.startswith("adapterkit") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_every_module_has_a_layer():
    missing = sorted({_unit(m) for m in MODULES} - set(BAND))
    assert not missing, f"add {missing} to LAYERS here and to the README's layer order"


def test_imports_follow_the_layer_order():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            a, b = _unit(name), _unit(target)
            if a != b and BAND[b] <= BAND[a]:
                wrong.append(f"{name} -> {target} ({'peer' if BAND[a] == BAND[b] else 'upward'})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Function-level imports count: an import-time cycle broken by a lazy import is still a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in MODULES.items():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in SIZE_EXEMPT:
            continue
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{rel}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}() {length} lines")
    assert not too_long, f"split by purpose (STYLE.md): files <= {MAX_FILE_LINES}, functions <= {MAX_FUNCTION_LINES}:\n" + "\n".join(too_long)


def _method_names() -> set[str]:
    from adapterkit.adapters import method_names

    return set(method_names())


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("adapterkit.adapters")))
def test_no_branch_on_a_method_name_outside_adapters(name):
    """Method-specific code lives in adapters/<method>.py; elsewhere a method is reached through the protocol."""
    names = _method_names()

    def is_method(node) -> bool:
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        if isinstance(node, ast.Attribute) and node.attr == "METHOD":
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_method(e) for e in node.elts)

    found = [node.lineno for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8")))
             if isinstance(node, ast.Compare) and any(is_method(x) for x in [node.left, *node.comparators])]
    assert not found, f"{name} compares against an adapter method name at line(s) {found}"


def test_import_and_help_load_no_torch():
    """`import adapterkit` and `adapterkit --help` stay fast: the API is re-exported lazily, the CLI imports each
    command's library inside the command."""
    import os
    import subprocess
    import sys

    code = ("import sys, adapterkit, adapterkit.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in "
            "sys.modules)); print(adapterkit.__version__, 'AdapterBank' in dir(adapterkit))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded, version = out.stdout.strip().splitlines()
    assert loaded == "[]", out.stdout + out.stderr
    from importlib.metadata import version as installed  # __version__ (session 23) is the installed distribution's

    assert version == f"{installed('adapterkit')} True"
    helped = subprocess.run([sys.executable, "-X", "importtime", "-m", "adapterkit", "--help"], capture_output=True,
                            text=True, env=env, check=True)
    assert "Usage" in helped.stdout and "torch" not in helped.stderr
