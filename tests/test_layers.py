"""megamft's packages import one way: each only from the layers below it.

The order, bottom to top: errors and the command wrapper; the config; arithmetic over the config
(sizing); the strict CUDA emulation; the process runtime (platform); fixes of library bugs (compat);
data; loss; model; checkpoint; evaluation (its problems, sandbox and pass@k, which training's in-run
evaluation also uses); training; the command lines; test support. Function-level imports count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megamft"
LAYERS = [
    {"errors"},
    {"entry_point"},
    {"config"},
    {"sizing"},
    {"emulation"},
    {"platform"},
    {"compat"},
    {"data"},
    {"loss"},
    {"model"},
    {"checkpoint"},
    {"eval"},
    {"training"},
    {"cli"},
    {"__main__", "__init__"},
    {"testing"},
]
RANK = {name: level for level, names in enumerate(LAYERS) for name in names}


def _imported_packages(tree: ast.AST) -> set[str]:
    """The megamft top-level packages an AST imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("megamft.")}
    return found


def upward_imports(package: Path) -> list[str]:
    """'file imports layer' for every import of a package at the same level or above, other than its own."""
    wrong = []
    for file in sorted(package.rglob("*.py")):
        own = file.relative_to(package).parts[0].removesuffix(".py")
        for imported in _imported_packages(ast.parse(file.read_text(), str(file))):
            if imported != own and RANK[imported] >= RANK[own]:
                wrong.append(f"{file.relative_to(package.parent)} imports megamft.{imported}")
    return wrong


def test_every_package_has_a_layer():
    packages = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a place in LAYERS"


def test_packages_import_only_the_layers_below_them():
    assert upward_imports(PACKAGE) == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    """The check itself: checkpoint code importing training (as run_folder once did) is reported."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "run_folder.py").write_text(
        "def bytes_needed(cfg):\n    from megamft.training.memory_estimate import checkpoint_bytes\n"
    )
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "loop.py").write_text("from megamft.checkpoint import run_folder\n")
    assert upward_imports(tmp_path) == [
        f"{tmp_path.name}/checkpoint/run_folder.py imports megamft.training"
    ]


def _module_name(file: Path, package: Path) -> str:
    parts = file.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mutual_imports(package: Path) -> list[tuple[str, str]]:
    """Pairs of megamft modules that import each other (at any depth of the file)."""
    files = {_module_name(f, package): f for f in package.rglob("*.py")}
    imports = {}
    for name, file in files.items():
        found = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        imports[name] = {m for m in found if m in files and m != name}
    return sorted(
        {tuple(sorted((a, b))) for a in imports for b in imports[a] if a in imports.get(b, ())}
    )


def test_no_two_modules_import_each_other():
    assert mutual_imports(PACKAGE) == []


def test_the_mutual_import_check_finds_a_pair(tmp_path):
    """The check itself, on the pair the packing code once formed (a function-level import counts)."""
    package = tmp_path / "megamft"
    (package / "data").mkdir(parents=True)
    (package / "data" / "sequences.py").write_text("from megamft.data import index_kernels\n")
    (package / "data" / "index_kernels.py").write_text(
        "def f():\n    from megamft.data.sequences import g\n"
    )
    assert mutual_imports(package) == [("megamft.data.index_kernels", "megamft.data.sequences")]


def test_arithmetic_imports_nothing_heavy():
    """Memory and FLOPs arithmetic loads without torch, megatron-core or numpy."""
    code = (
        "import sys, megamft.sizing.memory, megamft.sizing.flops, megamft.sizing.vocab, "
        "megamft.sizing.quantization\n"
        "print(sorted(m for m in ('torch', 'megatron', 'numpy', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
