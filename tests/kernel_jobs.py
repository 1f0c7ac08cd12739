"""A tiny CPU torch extension built as the fused CE kernels are, and the start-up job that builds it.

No CUDA toolkit or GPU exists on the test machines, so the tests build this
extension instead of csrc/: a real torch.utils.cpp_extension.load (ninja, the
C++ compiler, torch's FileBaton) into megamft's build folders
(megamft.loss.kernel_cache), through the same contract as
megamft.loss.fused_ce_build.build_extension: return the module or raise
(ToolkitMissing / KernelsNotBuilt: something missing; anything else: a build error).

    python tests/kernel_jobs.py FOLDER SOURCE   # build SOURCE into FOLDER (a process the tests kill)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).parent)
)  # ranks load this file by path; `jobs` lives beside it

KEY = "tiny"
NAME = "megamft_tiny_ext"
SOURCE = """#include <Python.h>
#define ANSWER {answer}
#define CONCAT_(a, b) a##b
#define CONCAT(a, b) CONCAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)
static PyObject* answer(PyObject*, PyObject*) {{ return PyLong_FromLong(ANSWER); }}
static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, nullptr}}, {{nullptr, nullptr, 0, nullptr}}}};
static PyModuleDef definition = {{PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods}};
PyMODINIT_FUNC CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {{ return PyModule_Create(&definition); }}
"""


def write_source(folder: Path, answer: int = 42) -> Path:
    """A one-function extension: answer() returns `answer`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.cpp"
    path.write_text(SOURCE.format(answer=answer))
    return path


def compile_into(source: Path, compiled: list | None = None):
    """build(folder) for kernel_cache.build_locked: torch's JIT build of `source` (appends to `compiled`)."""

    def build(folder: Path):
        from torch.utils.cpp_extension import load

        if compiled is not None:
            compiled.append(str(folder))
        return load(name=NAME, sources=[str(source)], build_directory=str(folder))

    return build


def build_or_load(folder: Path, source: Path, compiled: list | None = None):
    """What build_extension does for the fused CE kernels: the complete build in `folder`, else build it."""
    from megamft.loss import kernel_cache

    return kernel_cache.load_built(folder, KEY) or kernel_cache.build_locked(
        folder, KEY, compile_into(source, compiled), poll_s=0.05
    )


def load_only(folder: Path):
    """What load_extension does: the complete build in `folder`, else KernelsNotBuilt."""
    from megamft.loss import kernel_cache
    from megamft.loss.fused_ce_build import KernelsNotBuilt

    module = kernel_cache.load_built(folder, KEY)
    if module is None:
        raise KernelsNotBuilt(f"no complete build in {folder}")
    return module


def _scenario(name: str, root: Path, source: Path, local_rank: int, rank: int) -> dict:
    """One start-up under a stand-in build (see SCENARIOS); this rank's view of the outcome."""
    from megamft.loss import fused_ce
    from megamft.loss.fused_ce_build import ToolkitMissing
    from megamft.training.kernel_startup import prepare_fused_kernels

    folder = root / name / (f"node{rank}" if name == "two_nodes" else "node") / "ext"
    compiled: list = []

    def build():
        if name == "builder_fails":
            raise ToolkitMissing("no CUDA toolkit found (nvcc / CUDA_HOME; CUDA_HOME=None)")
        return build_or_load(folder, source, compiled)

    def load():
        if name == "a_rank_cannot_load" and rank == 1:
            raise OSError(f"{folder}/{NAME}.so: cannot open shared object file: Permission denied")
        return load_only(folder)

    decision = prepare_fused_kernels(
        local_rank, report=rank == 0, build=build, load=load, wait_s=120
    )
    module = fused_ce.kernels()
    return {
        "use_kernels": decision.use_kernels,
        "builders": decision.builders,
        "reason": decision.reason,
        "compiled": compiled,
        "answer": module.answer() if module is not None else None,
        "library": module.__file__ if module is not None else None,
    }


SCENARIOS = ("one_node", "builder_fails", "a_rank_cannot_load", "two_nodes")


def startup_scenarios(root: str, source: str) -> dict:
    """Every scenario in turn on this rank: one node (LOCAL_RANK as launched), its builder failing, a rank
    unable to load, and two nodes of one rank each (each its own local rank 0 and folder)."""
    import os

    from jobs import tiny_config

    from megamft.platform import distributed

    distributed.initialize(tiny_config())
    try:
        rank = int(os.environ["RANK"])
        return {
            name: _scenario(
                name,
                Path(root),
                Path(source),
                0 if name == "two_nodes" else distributed.local_rank(),
                rank,
            )
            for name in SCENARIOS
        }
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    build_or_load(Path(sys.argv[1]), Path(sys.argv[2]))
