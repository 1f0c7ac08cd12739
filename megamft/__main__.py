"""`python -m megamft ...` (also what torchrun runs with `-m megamft`)."""

import sys

# The guard matters: megatron's checkpoint writer starts a spawn-context
# multiprocessing manager, which re-imports the main module.
if __name__ == "__main__":
    from megamft.cli import main

    sys.exit(main())
