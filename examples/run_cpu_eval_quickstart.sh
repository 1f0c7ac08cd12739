#!/usr/bin/env bash
# The CPU quickstart with code-execution evaluation during training (11 minutes measured on a
# shared, busy 2-core machine; each of the three evaluations generates and runs 24 completions at TP=2):
#   1. the embedded corpus (examples/data/build_embedded_dataset.sh, once) plus a toy task of templated
#      one-line functions (examples/data/toy_functions.py), preprocessed together and decontaminated
#      against HumanEval and the held-out toy problems;
#   2. the quickstart's tiny model trained on it, pass@1 of the toy problems (held out, and seen in
#      training) measured every 40 steps, the best checkpoint kept (runs/quickstart_eval/best).
# Extra arguments are config overrides, e.g. train.train_steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f data/stdlib/indexed/manifest.json ]; then
    bash examples/data/build_embedded_dataset.sh data/stdlib
fi
if [ ! -f data/stdlib/indexed_eval/manifest.json ]; then
    python examples/data/toy_functions.py --train data/stdlib/jsonl/toy_functions.jsonl
    python tools/preprocess_data.py \
        --task code_completion=data/stdlib/jsonl/code_completion.jsonl \
        --task text_to_code=data/stdlib/jsonl/text_to_code.jsonl \
        --task code_to_docstring=data/stdlib/jsonl/code_to_docstring.jsonl \
        --task toy_functions=data/stdlib/jsonl/toy_functions.jsonl \
        --tokenizer data/stdlib/tokenizer.model --template mftcoder \
        --max-seq-length 2048 --overlong drop --workers 2 \
        --decontaminate humaneval --decontaminate examples/toy_functions_heldout.jsonl \
        --out data/stdlib/indexed_eval
fi
exec torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart_indexed.yaml \
    --config examples/quickstart_eval.yaml "$@"
