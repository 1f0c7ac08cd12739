#!/usr/bin/env bash
# The CPU quickstart: a tiny Llama-style model, tensor parallel over 2 processes, ~2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart.yaml "$@"
