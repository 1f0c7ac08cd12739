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
    packages = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a place in LAYERS"


def test_packages_import_only_the_layers_below_them():
    assert upward_imports(PACKAGE) == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    """The check itself: checkpoint code importing training (as run_folder once did) is reported."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "run_folder.py").write_text(
        "def bytes_needed(cfg):\n    from megamft.training.memory_estimate import checkpoint_bytes\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "loop.py").write_text("from megamft.checkpoint import run_folder\n")
    assert upward_imports(tmp_path) == [f"{tmp_path.name}/checkpoint/run_folder.py imports megamft.training"]


def test_arithmetic_imports_nothing_heavy():
    """Memory and FLOPs arithmetic loads without torch, megatron-core or numpy."""
    code = ("import sys, megamft.sizing.memory, megamft.sizing.flops, megamft.sizing.vocab, "
            "megamft.sizing.quantization\n"
            "print(sorted(m for m in ('torch', 'megatron', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
