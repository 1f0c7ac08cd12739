"""Convert checkpoints between Hugging Face and megamft (megatron dist checkpoint) formats.

    megamft-convert hf-to-megatron --hf PATH --out DIR [--target-tp 8 --target-pp 2] [--dry-run]
    megamft-convert megatron-to-hf --checkpoint DIR --out DIR [--hf-template HF_DIR] [--dtype bf16]

The megatron side is layout-free: a converted checkpoint loads at any TP/PP
(--target-tp/--target-pp only check that the model fits), and an export reads
a checkpoint written at any TP/PP. Outputs appear only once complete.
"""

from megamft.checkpoint.convert_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
