"""Estimate memory per device for a megamft config and world size.

python tools/estimate_memory.py --config examples/codellama-34b/full_32xh100.yaml --world-size 32
"""

import argparse

from megamft.config import load_config, validate
from megamft.entry_point import ArgumentParser, run_command


def main(argv=None) -> int:
    return run_command("estimate_memory", lambda: _estimate(argv))


def _estimate(argv) -> int:
    from megamft.sizing.memory import estimate

    parser = ArgumentParser(
        prog="estimate_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument(
        "--vocab-size", type=int, help="when model.vocab_size is unset (default 262, byte tokens)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    validate(cfg, args.world_size)
    vocab = cfg.model.vocab_size or args.vocab_size or 262
    print(estimate(cfg, args.world_size, vocab).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
