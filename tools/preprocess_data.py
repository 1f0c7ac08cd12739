"""Preprocess JSON Lines conversations into megatron indexed datasets: see megamft-preprocess --help."""

import sys

from megamft.data.preprocess_cli import main

if __name__ == "__main__":  # workers are spawned: they re-import this file
    sys.exit(main())
