#!/usr/bin/env bash
# The CPU quickstart, the way a real fine-tune is prepared and run (about 3 minutes on 2 cores):
#   1. build the embedded multitask corpus offline (once): JSON Lines from Python's standard library,
#      a sentencepiece tokenizer trained on it, megamft-preprocess into megatron indexed datasets;
#   2. fine-tune a tiny Llama-style model on it, tensor parallel over 2 processes, samples packed.
# Extra arguments are config overrides, e.g. train.train_steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f data/stdlib/indexed/manifest.json ]; then
    bash examples/data/build_embedded_dataset.sh data/stdlib
fi
exec torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart_indexed.yaml "$@"
