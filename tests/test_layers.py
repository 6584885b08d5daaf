"""The package's layers, checked on every import statement (module level and inside functions):
each module imports fmconvert only from its own layer or the layers below it, the math imports
nothing but torch and the standard library, and only the integration layer and above import
diffusers at module level. A new module is checked by being in the package: nothing to register."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fmconvert

PACKAGE = Path(fmconvert.__file__).parent
#: bottom to top; a module may import from its own layer and the layers before it
LAYERS = ("errors", "zoo", "files", "math", "integration", "sampling", "evaluation", "training", "cli")
#: the module paths converted folders import (their shims): re-exports that nothing inside imports
FOLDER_PATHS = ("fmconvert.adapters", "fmconvert.schedulers", "fmconvert.pipelines")
#: may import any layer: the package's lazy public names, the test stand-ins, ``python -m fmconvert``
ANYWHERE = ("fmconvert", "fmconvert.testing", "fmconvert.__main__", *FOLDER_PATHS)
#: the standard library's and torch's modules the math may import
MATH_ALLOWED = ("torch", "math", "dataclasses", "typing", "__future__", "functools", "itertools", "collections",
                "bisect", "enum", "numpy", "torchdiffeq", "scipy")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    if module == "fmconvert.zoo.digits":  # a diffusers ModelMixin: at the integration's height
        return LAYERS.index("integration")
    return LAYERS.index(head)


def _imports(tree: ast.Module, module: str):
    """(imported module, line, at module level) for every import in the file; one under ``if
    TYPE_CHECKING:`` or in a function is not at module level."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + (1 if _is_package(module) else 0)]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base in ("fmconvert", "fmconvert.integration") else [base]
            for name in names:
                yield name, node.lineno, id(node) in top


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


MODULES = sorted((_name(p), p) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_run_down_the_layers(module, path):
    if module in ANYWHERE:
        return
    tree = ast.parse(path.read_text())
    mine = _layer(module)
    for imported, line, _ in _imports(tree, module):
        if not imported.startswith("fmconvert"):
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}"
        assert imported not in FOLDER_PATHS and not imported.startswith(tuple(p + "." for p in FOLDER_PATHS)), \
            f"{where}: a folder path, kept for written folders only; import from fmconvert.integration"
        if imported in ("fmconvert", "fmconvert.__version__"):
            continue
        assert _layer(imported) <= mine, f"{where}: an import up the layers ({LAYERS[mine]} < {LAYERS[_layer(imported)]})"


@pytest.mark.parametrize("module,path", [(m, p) for m, p in MODULES if m.startswith(("fmconvert.math", "fmconvert.files"))],
                         ids=[m for m, _ in MODULES if m.startswith(("fmconvert.math", "fmconvert.files"))])
def test_the_bottom_layers_import_no_diffusers(module, path):
    for imported, line, _ in _imports(ast.parse(path.read_text()), module):
        assert imported.split(".")[0] not in ("diffusers", "transformers", "huggingface_hub"), f"{module}:{line} imports {imported}"
        if module.startswith("fmconvert.math"):
            assert imported.split(".")[0] in MATH_ALLOWED or imported.startswith("fmconvert.math"), \
                f"{module}:{line} imports {imported}: the math imports torch and the standard library only"


#: the modules that import diffusers at module level: the integration, and the zoo's classifier (a ModelMixin)
DIFFUSERS_AT_MODULE_LEVEL = ("fmconvert.integration.", "fmconvert.zoo.digits")


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_only_the_integration_imports_diffusers_at_module_level(module, path):
    """Elsewhere diffusers is imported where it is used, so ``wrap`` and ``--help`` stay light."""
    if module.startswith(DIFFUSERS_AT_MODULE_LEVEL):
        return
    for imported, line, top in _imports(ast.parse(path.read_text()), module):
        if top:
            assert not imported.startswith("diffusers"), f"{module}:{line} imports diffusers at module level"


def test_a_wrong_import_is_caught(tmp_path):
    """The check above can fail: an upward import in a math module is reported."""
    tree = ast.parse("from fmconvert.sampling.runs import Run\n")
    imported = [i for i, _, _ in _imports(tree, "fmconvert.math.grids")]
    assert imported == ["fmconvert.sampling.runs"] and _layer(imported[0]) > _layer("fmconvert.math.grids")
