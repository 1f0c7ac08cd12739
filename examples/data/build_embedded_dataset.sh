#!/usr/bin/env bash
# The embedded multitask corpus, the offline way a real dataset is prepared:
#   1. export it as MFTCoder-style JSON Lines, one file per task;
#   2. train a sentencepiece BPE tokenizer on it;
#   3. megamft-preprocess it into megatron indexed datasets (HumanEval-decontaminated);
#   4. fine-tune on it:  torchrun --nproc-per-node 2 -m megamft train --config examples/quickstart_indexed.yaml
# Usage: examples/data/build_embedded_dataset.sh [OUT_DIR]   (default: data/stdlib)
set -euo pipefail
out=${1:-data/stdlib}
python tools/export_stdlib_corpus.py --out "$out/jsonl" --max-chars 6000 --samples-per-task 100000
python tools/train_tokenizer.py --input "$out/jsonl" --out "$out/tokenizer.model" --vocab-size 8000
python tools/preprocess_data.py \
    --task code_completion="$out/jsonl/code_completion.jsonl" \
    --task text_to_code="$out/jsonl/text_to_code.jsonl" \
    --task code_to_docstring="$out/jsonl/code_to_docstring.jsonl" \
    --tokenizer "$out/tokenizer.model" --template mftcoder \
    --max-seq-length 2048 --overlong drop --decontaminate humaneval --workers 2 \
    --out "$out/indexed"
