"""``psa-jax`` command line: one module per subcommand here parses arguments and calls library
functions, nothing more; library modules hold no argparse.

``info`` builds a config's models with random weights and runs them once, end to end.

Errors: psa_jax's own (:class:`~psa_jax.core.errors.PsaJaxError`: bad input, named) print one
line ``psa-jax <command>: error: ...`` and exit 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from psa_jax.core.errors import EXIT_BAD_INPUT, PsaJaxError


def _info(args: argparse.Namespace) -> int:
    from psa_jax.config import load_config
    from psa_jax.models.smoke import run_models

    report = run_models(load_config(args.config), seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psa-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="build a config's models (random weights) and run them once")
    info.add_argument("--config", default="configs/tiny.py", help="path to a configs/*.py file")
    info.add_argument("--seed", type=int, default=0)
    info.set_defaults(func=_info)
    # Each subcommand's module imports its stage only when the parser is built.
    from psa_jax.cli import data, demo, eval, export, sample, train

    for module in (data, train, sample, eval, export, demo):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "accepts_extra", False):  # train: --config.KEY=VALUE overrides
            return args.func(args, extra)
        return args.func(args)
    except PsaJaxError as e:
        print(f"psa-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
