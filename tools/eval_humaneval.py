"""HumanEval pass@k of a Hugging Face folder or a megamft checkpoint (same as `megamft eval humaneval`)."""

import sys

from megamft.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
