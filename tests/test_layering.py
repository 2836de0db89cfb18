"""The rooms of ``dse`` import one way: ``cli -> study -> results -> {space, evaluate} -> decompose
-> model -> core``. Every module is parsed with ``ast`` (imports inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType

import pytest

import dse

ROOT = Path(dse.__file__).parent
# room -> its height; a room may import only rooms below it (and itself)
RANK = {"core": 0, "model": 1, "decompose": 2, "space": 3, "evaluate": 3, "results": 4, "study": 5, "cli": 6}
NO_OPTUNA_BELOW = RANK["study"]
FORBIDDEN = {("evaluate", "decompose")}  # evaluation works on any in-memory model, however it was made


def modules():
    """``{dotted name: path}`` of every module of the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def imports(name: str, path: Path):
    """The absolute names ``name`` imports (each ``from X import y`` as ``X`` and ``X.y``)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            yield prefix
            yield from (f"{prefix}.{a.name}" for a in node.names)


def resolve(target: str):
    """The package module ``target`` names (a module, or an attribute of one), or None if outside."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dse"


def graph():
    edges = {}
    for name, path in MODULES.items():
        targets = {resolve(t) for t in imports(name, path)}
        # a submodule importing its own package (the face) is Python's doing, not an arrow
        edges[name] = {t for t in targets if t and t != name and t != "dse" and not name.startswith(t + ".")}
    return edges


def test_every_module_is_in_a_room():
    rooms = {room(m) for m in MODULES} - {"dse"}
    assert rooms == set(RANK), rooms ^ set(RANK)


def test_imports_run_one_way():
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            a, b = room(source), room(target)
            if a == "dse" or a == b:
                continue
            if RANK[b] >= RANK[a] or (a, b) in FORBIDDEN:
                wrong.append(f"{source} -> {target}")
    assert not wrong, (
        "imports against the order cli -> study -> results -> {space, evaluate} -> decompose -> "
        "model -> core:\n" + "\n".join(sorted(wrong))
    )


def test_no_import_cycles_between_modules():
    edges = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_nothing_below_study_imports_optuna():
    offenders = [
        name
        for name, path in MODULES.items()
        if room(name) in RANK
        and RANK[room(name)] < NO_OPTUNA_BELOW
        and any(t == "optuna" or t.startswith("optuna.") for t in imports(name, path))
    ]
    assert not offenders, offenders


def test_core_imports_nothing_of_dse():
    for name, path in MODULES.items():
        if room(name) == "core":
            inside = {resolve(t) for t in imports(name, path)} - {None}
            assert all(room(t) == "core" for t in inside), (name, inside)


@pytest.mark.parametrize("name", sorted(dse._LAZY))
def test_public_api_names_resolve(name):
    assert getattr(dse, name) is not None


def test_loading_a_compressed_model_imports_no_study_machinery():
    code = (
        "import sys, dse; dse.load_compressed; dse.Plan; dse.decompose_; "
        "print(sorted(m for m in ('optuna', 'pandas', 'lm_eval', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports_torch(code: str) -> bool:
    """Whether running ``code`` in a fresh interpreter imports torch (its last line of output)."""
    code += "\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def test_dse_list_imports_no_torch():
    assert not _imports_torch("import sys; from dse.cli import main; sys.argv = ['dse', 'list']; main()")


def test_dse_space_on_the_shipped_spaces_imports_no_torch():
    """``dse space`` reads, validates and counts every shipped space without torch: the shapes come
    from the config's fields (inline, or the GGUF file's metadata for a built-in name)."""
    files = sorted(str(p) for p in (ROOT.parent / "spaces").glob("*.yaml"))
    assert files
    assert not _imports_torch(f"import sys; from dse.cli import main; sys.argv = ['dse', 'space', *{files!r}]; main()")


FACES = sorted(m for m in MODULES if m.count(".") == 1 and hasattr(import_module(m), "__all__"))


@pytest.mark.parametrize("face", FACES)
def test_no_public_name_of_a_face_is_shadowed_by_a_submodule(face):
    """Importing a submodule sets the package attribute of its name: a lazy name must not be one."""
    for name in MODULES:
        if name.startswith(face + "."):
            import_module(name)
    package = import_module(face)
    assert not [n for n in package.__all__ if isinstance(getattr(package, n), ModuleType)]
