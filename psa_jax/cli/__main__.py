"""``python -m psa_jax.cli``: the ``psa-jax`` command (multi-process launches use it)."""

import sys

from psa_jax.cli import main

sys.exit(main())
