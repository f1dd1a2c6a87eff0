"""A Python interpreter with ``gs://`` on the fake GCS of ``tests/fake_gcs.py``:
``python tests/scripts/with_fake_gcs.py ROOT -m MODULE ARGS...`` runs ``MODULE`` as
``python -m`` would, with ``gs://BUCKET/...`` at ``ROOT/BUCKET/...`` (a subprocess of a test,
e.g. each ``psa-jax train`` of a sweep, sees the same fake bucket as the test)."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fake_gcs

root, flag, module, *args = sys.argv[1:]
if flag != "-m":
    sys.exit("usage: with_fake_gcs.py ROOT -m MODULE ARGS...")
sys.argv = [module, *args]
with fake_gcs.installed(root):
    runpy.run_module(module, run_name="__main__", alter_sys=True)
