"""``psa-jax train`` with a fault hook: ``python tests/scripts/train_with_fault.py kill_at=N
<psa-jax train arguments>`` (the subprocess twin of ``trainer.train(batch_hook=...)``)."""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faults

from psa_jax import cli
from psa_jax.cli import train as train_cli

name, _, step = sys.argv[1].partition("=")
train_cli.train = functools.partial(train_cli.train, batch_hook=getattr(faults, name)(int(step)))
sys.exit(cli.main(sys.argv[2:]))
