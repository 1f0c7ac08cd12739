"""Installing megamft: CPU machines get torch's CPU build, clusters keep their own torch, a broken
Transformer Engine is not taken as present.

The install tests ask pip itself what it would do (``pip install --dry-run --report``) for an
environment holding only a given torch (its metadata, as an installed distribution).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megamft.model.spec import resolve_attention_backend

ROOT = Path(__file__).resolve().parents[1]


def _environment_with_torch(tmp_path: Path, version: str | None) -> Path:
    """A bare virtual environment whose only package is torch `version` (its installed metadata)."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    if version is not None:
        site = next(env.glob("lib/python*/site-packages"))
        info = site / f"torch-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return env / "bin" / "python"


def _planned_installs(python: Path, tmp_path: Path, *args: str) -> dict[str, str]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "version", ["2.12.0", "2.14.0a0+nv26.10"]
)  # a release; an NGC container's build
def test_installing_into_an_environment_keeps_its_torch(tmp_path, version):
    planned = _planned_installs(_environment_with_torch(tmp_path, version), tmp_path, ".")
    assert "megamft" in planned and "megatron-core" in planned
    assert "torch" not in planned, planned


@pytest.mark.slow
def test_the_cpu_install_takes_torch_cpu_build_and_no_cuda_package(tmp_path):
    planned = _planned_installs(
        _environment_with_torch(tmp_path, None), tmp_path, "-c", "constraints/cpu.txt", ".[test]"
    )
    assert planned["torch"].endswith("+cpu"), planned["torch"]
    assert not [name for name in planned if name.startswith(("nvidia", "triton", "cuda"))], planned


def test_a_broken_transformer_engine_is_not_taken_as_present(tmp_path):
    """A TE whose torch extension was built for another torch: ``transformer_engine/pytorch/__init__.py``
    imports its compiled module ``transformer_engine_torch``, which then fails with ImportError (an
    undefined symbol). megatron-core records that as ``HAVE_TE = False`` (models/gpt/gpt_layer_specs.py) and
    builds placeholders; megamft must agree with it, say why, and refuse attention_backend=te."""
    package = tmp_path / "site" / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    probe = textwrap.dedent("""
        import json
        from megamft.platform.device import _installed, transformer_engine_status
        usable, problem = transformer_engine_status()
        print(json.dumps({"found": _installed("transformer_engine"), "usable": usable, "problem": problem}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["found"]  # the package is there: a find_spec test would call it present
    assert got["usable"] is False and "undefined symbol" in got["problem"]
    assert resolve_attention_backend("auto", got["usable"], False) == "torch"
    with pytest.raises(ValueError, match="installed but does not import .*undefined symbol"):
        resolve_attention_backend("te", got["usable"], False, got["problem"])
    # megatron-core itself cannot import with it (tensor_parallel/random.py catches only ModuleNotFoundError):
    # the command says so in one line instead of a traceback from inside megatron.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megamft",
            "check",
            "--config",
            "examples/quickstart.yaml",
            "--world-size",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Transformer Engine is installed but does not import" in lines[0], (
        lines
    )


def test_the_wheel_holds_every_file_the_package_reads(tmp_path):
    """A non-editable install (CI's, a cluster's) has only what the wheel holds: every non-Python file
    under megamft/ (the index kernels' C source, compiled at run time) must be in it, or `megamft train`
    fails on indexed data once installed."""
    import zipfile

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("megamft-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    data_files = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "megamft").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert data_files and data_files <= held, sorted(data_files - held)
