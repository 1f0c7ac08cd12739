#!/usr/bin/env bash
# One command that proves a GPU machine runs megamft (see benchmarks/gpu_check.py for the checks).
#
#   bash benchmarks/gpu_check.sh WHEELHOUSE [OUTDIR]          # GPU machine, offline
#   bash benchmarks/gpu_check.sh --dry-run [OUTDIR]           # CPU: tiny checks, current environment
#   bash benchmarks/gpu_check.sh --dry-run WHEELHOUSE OUTDIR  # CPU, installing the wheelhouse first
#
# WHEELHOUSE comes from benchmarks/prepare_wheelhouse.sh. The GPU machine needs Python 3.12 with
# pip, a CUDA build of torch, numpy, triton, nvcc and ninja; nothing is downloaded. Installs the
# wheelhouse with `pip install --no-index` (torch is never touched; megamft itself with --no-deps,
# editable from this checkout), then runs every check within a time budget and writes
# OUTDIR/gpu_check.json after each one (default OUTDIR: runs/gpu_check, runs/gpu_check_dry).
#
# Environment: GPU_CHECK_BUDGET seconds for everything, install included (default 420 on a GPU,
# 280 dry; a hard stop follows 30 s later), GPU_CHECK_DRY_RUN=1 (same as --dry-run), PYTHON.
# Then benchmarks/train_throughput.py runs within THROUGHPUT_BUDGET seconds (default 300 on a GPU,
# 120 dry), writing OUTDIR/train_throughput.txt.
# Exit status: 0 when every check passed.
set -uo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
START=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
positional=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) positional+=("$1") ;;
    esac
    shift
done
WH=""
if [[ $DRY == 1 ]]; then
    case ${#positional[@]} in
        0) OUT=$ROOT/runs/gpu_check_dry ;;
        1) OUT=${positional[0]} ;;
        2) WH=${positional[0]}; OUT=${positional[1]} ;;
        *) usage >&2; exit 2 ;;
    esac
    BUDGET=${GPU_CHECK_BUDGET:-280}
else
    if [[ ${#positional[@]} -lt 1 || ${#positional[@]} -gt 2 ]]; then usage >&2; exit 2; fi
    WH=${positional[0]}
    OUT=${positional[1]:-$ROOT/runs/gpu_check}
    BUDGET=${GPU_CHECK_BUDGET:-420}
fi
# The interpreter that has torch (a venv's `python` may differ from the system's `python3`).
if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
else
    PY=python3
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY=$candidate
            break
        fi
    done
fi

say() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
exec > >(tee -a "$OUT/console.log") 2>&1
: > "$OUT/install_steps.tsv"
say "megamft GPU check: $([[ $DRY == 1 ]] && echo dry run || echo GPU), budget ${BUDGET}s, report $OUT/gpu_check.json"

# step NAME COMMAND...: run, log to install.log, record name/status/seconds for the report.
step() {
    local name=$1 began=$SECONDS rc
    shift
    say "install: $name"
    echo "### $name: $*" >> "$OUT/install.log"
    "$@" >> "$OUT/install.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" >> "$OUT/install_steps.tsv"
    if [[ $rc != 0 ]]; then
        say "install: $name failed (exit $rc); last lines of $OUT/install.log:"
        tail -n 6 "$OUT/install.log" | sed 's/^/    /'
    fi
    return $rc
}

unpack_wheels() {  # no pip at all: unzip every wheel into $OUT/site (what pip would do, without scripts)
    "$PY" - "$WH" "$OUT/site" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

wheelhouse, site = Path(sys.argv[1]), Path(sys.argv[2])
site.mkdir(parents=True, exist_ok=True)
for wheel in sorted(wheelhouse.glob("*.whl")):
    if wheel.name.startswith(("setuptools-", "wheel-")):
        continue
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
for data in site.glob("*.data"):
    for kind in ("purelib", "platlib"):
        if (data / kind).is_dir():
            shutil.copytree(data / kind, site, dirs_exist_ok=True)
print(f"unpacked {len(list(wheelhouse.glob('*.whl')))} wheels into {site}")
EOF
}

install() {
    if [[ ! -f "$WH/requirements-resolved.txt" ]]; then
        say "ERROR: $WH is not a wheelhouse from benchmarks/prepare_wheelhouse.sh (no requirements-resolved.txt)"
        return 1
    fi
    WH=$(cd "$WH" && pwd)
    export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        say "install: no pip for $PY; unpacking the wheels instead"
        step unpack-wheels unpack_wheels || return 1
        export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
        return 0
    fi
    local pip=("$PY" -m pip install --no-index --find-links "$WH")
    local others=()
    for wheel in "$WH"/*.whl; do [[ $(basename "$wheel") == megamft-* ]] || others+=("$wheel"); done
    # With pip's resolver (the installed torch satisfies megatron-core's torch>=2.6); if that
    # fails, every wheel as it is, without resolving.
    step dependencies "${pip[@]}" -r "$WH/requirements-resolved.txt" \
        || step dependencies-no-deps "${pip[@]}" --no-deps "${others[@]}" || return 1
    step tensorboard-writer "${pip[@]}" --no-deps -r "$WH/requirements-no-deps.txt" || return 1
    # megamft from this checkout, editable: its package_dir maps megamft._csrc to csrc/ (the CUDA
    # sources) for imports from the source tree too. Else installed, and the source tree kept off
    # sys.path (PYTHONSAFEPATH) so that the installed copy, which has megamft._csrc, is imported.
    if step megamft-editable "${pip[@]}" --no-deps --use-pep517 -e "$ROOT" \
        || { ! "$PY" -m pip install --help 2>/dev/null | grep -q -- --use-pep517 \
             && step megamft-editable-pep660 "${pip[@]}" --no-deps -e "$ROOT"; }; then  # a pip without the flag
        :
    elif step megamft-checkout "${pip[@]}" --no-deps --use-pep517 "$ROOT" \
        || step megamft-wheel-from-wheelhouse "${pip[@]}" --no-deps "$WH"/megamft-*.whl; then
        export PYTHONSAFEPATH=1
    else
        return 1
    fi
    "$PY" -m pip check >> "$OUT/install.log" 2>&1 || true  # for the log only: tensorboard lacks its UI deps
    return 0
}

if [[ -n $WH ]]; then
    install || say "install FAILED: running the checks anyway (the environment check reports what is missing)"
    say "install took $((SECONDS - START))s"
else
    say "dry run: no wheelhouse, using the current environment ($PY)"
fi

LEFT=$((BUDGET - (SECONDS - START)))
(( LEFT < 60 )) && LEFT=60
HARD=$((LEFT + 30))
flags=(--out "$OUT" --budget "$LEFT")
[[ $DRY == 1 ]] && flags+=(--dry-run)
say "running the checks: ${LEFT}s budget, hard stop after ${HARD}s"
if command -v timeout >/dev/null 2>&1; then
    timeout --signal=TERM --kill-after=10 "$HARD" "$PY" benchmarks/gpu_check.py "${flags[@]}"
else
    "$PY" benchmarks/gpu_check.py "${flags[@]}"
fi
rc=$?
if [[ $rc == 124 || $rc == 137 || $rc == 143 ]]; then
    say "the checks were stopped at the hard limit (exit $rc); the report so far:"
    "$PY" benchmarks/gpu_check.py --summarize "$OUT"
fi

# Training throughput against transformers (+ PEFT): its own time budget, after the checks, so
# it never takes time from them; its table goes to OUTDIR/train_throughput.txt. Its exit status
# does not change the check's (a benchmark measures, it does not pass or fail).
TP_BUDGET=${THROUGHPUT_BUDGET:-$([[ $DRY == 1 ]] && echo 120 || echo 300)}
tp_flags=()
[[ $DRY == 1 ]] && tp_flags+=(--steps 1 --warmup 1)
say "training throughput vs transformers + PEFT (benchmarks/train_throughput.py, ${TP_BUDGET}s budget)"
if command -v timeout >/dev/null 2>&1; then
    timeout --signal=TERM --kill-after=10 "$TP_BUDGET" "$PY" benchmarks/train_throughput.py "${tp_flags[@]}" \
        > "$OUT/train_throughput.txt" 2> "$OUT/train_throughput.log"
else
    "$PY" benchmarks/train_throughput.py "${tp_flags[@]}" > "$OUT/train_throughput.txt" 2> "$OUT/train_throughput.log"
fi
say "train_throughput exit status $?: $OUT/train_throughput.txt"
cat "$OUT/train_throughput.txt"
say "finished in $((SECONDS - START))s, exit status $rc; report: $OUT/gpu_check.json"
exit $rc
