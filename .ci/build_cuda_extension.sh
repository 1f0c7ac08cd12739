#!/usr/bin/env bash
# CI: build, link and import the fused cross-entropy CUDA extension
# (csrc/fused_ce.cu + csrc/fused_ce_binding.cpp) against a CUDA build of torch.
#
# No GPU is needed: nothing is run on a device, but every compile and link error
# of the kernels and of the torch binding shows, and the import resolves every
# symbol. The build goes through megamft.loss.fused_ce_build.build_extension, the
# call that training's start-up, `megamft build-kernels` and kernels() make on GPU
# machines (megamft.loss.fused_ce_build imports only torch and the standard
# library: the CUDA venv holds only torch and ninja, not megamft's other deps).
# A second process then loads the recorded build with no CUDA toolkit, as a
# training image with prebuilt kernels does.
#
# The CUDA torch (~5.4 GB) goes into a venv outside the repository, reused when
# present: $MEGAMFT_CUDA_VENV, default ${TMPDIR:-/tmp}/megamft-cuda-venv.
# Exits 0 with a message when nvcc is absent; non-zero on any build, link or
# import error.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ]; then
    echo "build_cuda_extension: SKIPPED: nvcc not found (install the CUDA toolkit to check the extension build)"
    exit 0
fi
# CUDA_HOME: given, else the toolkit nvcc belongs to (nvcc may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
    TOP=$("$NVCC" --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    CUDA_HOME=$(realpath "${TOP:-$(dirname "$NVCC")/..}")
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
NVCC_RELEASE=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')

VENV=${MEGAMFT_CUDA_VENV:-${TMPDIR:-/tmp}/megamft-cuda-venv}
TORCH_SPEC=${MEGAMFT_CUDA_TORCH:-torch==2.14.1}  # takes a CUDA 13 build here (FACTS.md)
fail() {
    echo "build_cuda_extension: FAILED: $*  ($(( $(date +%s) - START )) s)"
    exit 1
}

if ! "$VENV/bin/python" -c "import torch, ninja" >/dev/null 2>&1; then
    echo "build_cuda_extension: creating $VENV with $TORCH_SPEC and ninja (several GB, a few minutes)"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || fail "could not create the venv $VENV"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" ninja || fail "could not install $TORCH_SPEC ninja into $VENV"
fi
export PATH="$VENV/bin:$PATH"  # ninja
TORCH_CUDA=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
[ -n "$TORCH_CUDA" ] || fail "the torch in $VENV is not a CUDA build (set MEGAMFT_CUDA_TORCH to one)"
echo "build_cuda_extension: nvcc $NVCC_RELEASE at $CUDA_HOME, torch CUDA $TORCH_CUDA, arch $TORCH_CUDA_ARCH_LIST"

BUILD_DIR="$(dirname "$VENV")/megamft-cuda-build"
rm -rf "$BUILD_DIR" && mkdir -p "$BUILD_DIR"  # a fresh build every run: no stale cached .so

"$VENV/bin/python" - "$ROOT" "$BUILD_DIR" <<'EOF'
import sys
import time
from pathlib import Path

import torch

root, build_dir = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(root))
from megamft.loss import fused_ce_build

problem = fused_ce_build.toolkit_problem()
if problem is not None:
    sys.exit(f"toolkit check: {problem}")
start = time.time()
ext = fused_ce_build.build_extension(verbose=True, build_directory=build_dir, sources=root / "csrc")
print(f"built, linked and imported {ext.__file__} in {time.time() - start:.0f} s")
for name in ("shard_stats", "finalize", "backward_inplace"):
    if not hasattr(ext, name):
        sys.exit(f"the extension lacks {name}")
# The binding's checks run without a GPU: a host tensor must raise, not crash.
try:
    ext.shard_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0)
except RuntimeError as exc:
    assert "logits must be a CUDA tensor" in str(exc), exc
else:
    sys.exit("shard_stats accepted host tensors")
EOF
STATUS=$?
[ $STATUS -eq 0 ] || fail "compile, link or import error (see above)"

# The recorded build loads in a process that has no CUDA toolkit, and builds nothing.
CUDA_HOME=/nonexistent PATH=/usr/bin:/bin "$VENV/bin/python" - "$ROOT" "$BUILD_DIR" <<'EOF' \
    || fail "the recorded build in $BUILD_DIR did not load without the toolkit"
import sys
from pathlib import Path

root, build_dir = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(root))
from megamft.loss import fused_ce_build

ext = fused_ce_build.load_extension(build_directory=build_dir, sources=root / "csrc")
print(f"loaded the recorded build {ext.__file__} without a CUDA toolkit")
EOF
echo "build_cuda_extension: OK: fused_ce extension built, linked and imported in $(( $(date +%s) - START )) s"
