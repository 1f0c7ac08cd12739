#!/usr/bin/env bash
# Download every wheel that benchmarks/gpu_check.sh installs on an offline GPU machine.
#
#   bash benchmarks/prepare_wheelhouse.sh OUT
#
# Run it on a machine with pip and registry access (any OS; pip downloads for the target).
# The target is the GPU machine: Python 3.12, manylinux x86_64, with a CUDA build of torch,
# numpy and triton already installed. Those three are not downloaded; everything else the
# check needs is: megatron-core and megamft's other runtime dependencies, pytest, transformers
# (the export check loads the export with it) with its dependencies, tensorboard without its
# server-side dependencies (megamft writes event files whenever checkpoint.save_dir is set),
# setuptools and wheel (to install the megamft checkout itself), and a megamft wheel built from
# this checkout (a fallback if the checkout cannot be installed there).
#
# Writes into OUT: the wheels, requirements-resolved.txt and requirements-no-deps.txt (what
# gpu_check.sh installs), MANIFEST.txt (file, bytes, sha256). Fails if OUT exceeds 60 MB.
#
# Environment: PYTHON (default python3), WHEELHOUSE_PYTHON_VERSION (default 3.12, the target's),
# WHEELHOUSE_MAX_MB (default 60).
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then usage; exit 2; fi

OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TARGET_PY=${WHEELHOUSE_PYTHON_VERSION:-3.12}
MAX_MB=${WHEELHOUSE_MAX_MB:-60}

# Top-level requirements, installed with pip's resolver (dependencies come from OUT or are
# already installed, e.g. torch's jinja2/filelock/fsspec/typing-extensions).
RESOLVED=(
    "megatron-core==0.16.1"
    "sentencepiece==0.2.3"
    "tokenizers==0.23.3"
    "safetensors==0.8.0"
    "pyyaml==6.0.4"
    "jinja2>=3.1"
    "tqdm==4.70.1"
    "psutil==7.2.2"
    "pytest==9.2.0"
    "transformers==5.24.0"
    "peft==0.21.2"         # the LoRA baseline of benchmarks/train_throughput.py
    "accelerate==1.15.0"   # peft's dependency
)
# Installed with --no-deps: torch.utils.tensorboard's SummaryWriter needs only these three
# (tensorboard's grpcio, pillow, werkzeug, markdown and data server serve its web UI).
NO_DEPS=(
    "tensorboard==2.21.0"
    "protobuf==7.36.2"
    "absl-py==2.5.1"
)
# Every wheel downloaded: the above plus their dependency closure (minus torch, numpy,
# triton), pinned to the versions the CPU test suite runs with.
DOWNLOAD=(
    "${RESOLVED[@]/jinja2>=3.1/jinja2==3.1.6}" "${NO_DEPS[@]}"
    # megatron-core, pytest
    "packaging==26.4" "iniconfig==2.3.1" "pluggy==1.7.0" "pygments==2.21.0" "markupsafe==3.0.4"
    # transformers -> huggingface-hub -> httpx2, typer
    "huggingface-hub==2.4.0" "regex==2026.11.19" "hf-xet==1.8.0" "filelock==4.3.1" "fsspec==2026.9.0"
    "typing-extensions==4.16.0" "httpx2==2.16.2" "httpcore2==2.16.2" "h11==0.16.0" "anyio==4.16.0"
    "idna==3.20" "truststore==0.10.5" "click==8.5.1" "typer==0.29.2" "pydantic==2.14.4"
    "pydantic-core==2.50.5" "typing-inspection==0.4.5" "annotated-types==0.8.0" "shellingham==1.5.4"
    "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "annotated-doc==0.0.7"
    # building the megamft checkout on the GPU machine (pip's isolated build environment)
    "setuptools==84.2.1" "wheel==0.48.0"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "[prepare] downloading ${#DOWNLOAD[@]} wheels for Python $TARGET_PY (manylinux x86_64) into $OUT"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
    --implementation cp "${platform_args[@]}" -d "$OUT" "${DOWNLOAD[@]}"

echo "[prepare] building the megamft wheel from $ROOT (no dependencies)"
rm -f "$OUT"/megamft-*.whl
"$PY" -m pip wheel --quiet --no-deps -w "$OUT" "$ROOT"

printf '%s\n' "# pip install --no-index --find-links WHEELHOUSE -r requirements-resolved.txt" \
    "${RESOLVED[@]}" > "$OUT/requirements-resolved.txt"
printf '%s\n' "# pip install --no-index --find-links WHEELHOUSE --no-deps -r requirements-no-deps.txt" \
    "${NO_DEPS[@]}" > "$OUT/requirements-no-deps.txt"

# Wheels a previous run with other pins left behind would be installed by the fallback.
"$PY" - "$OUT" "${DOWNLOAD[@]}" <<'EOF'
import hashlib, re, sys
from pathlib import Path

out, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
pins = {norm(re.split(r"[=<>]", w)[0]): re.split(r"==", w)[1] for w in wanted}
pins["megamft"] = None
lines, total = [], 0
for wheel in sorted(out.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if norm(name) not in pins or (pins[norm(name)] and pins[norm(name)] != version):
        print(f"[prepare] removing stale {wheel.name}")
        wheel.unlink()
        continue
    data = wheel.read_bytes()
    total += len(data)
    lines.append(f"{wheel.name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
missing = sorted(set(pins) - {norm(l.split("-")[0]) for l in lines})
(out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
print(f"[prepare] {len(lines)} wheels, {total / 1e6:.1f} MB")
if missing:
    sys.exit(f"[prepare] missing wheels: {missing}")
EOF

total_bytes=$(du -sb "$OUT" | cut -f1)
total_mb=$(( (total_bytes + 999999) / 1000000 ))
echo "[prepare] $OUT: $total_mb MB in all (limit $MAX_MB MB)"
if (( total_bytes > MAX_MB * 1000000 )); then
    echo "[prepare] ERROR: the wheelhouse is larger than $MAX_MB MB" >&2
    exit 1
fi
echo "[prepare] done; on the GPU machine: bash benchmarks/gpu_check.sh $OUT [OUTDIR]"
