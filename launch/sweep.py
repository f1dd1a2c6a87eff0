#!/usr/bin/env python
"""Run an ablation sweep file: ``python launch/sweep.py configs/sweeps/X.py --out DIR [...]``.

The same as ``psa-jax sweep ...`` (every flag is passed through); see psa_jax/cli/sweep.py.
Gather the results with ``psa-jax sweep-report --sweep DIR``.
"""

import sys

from psa_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
