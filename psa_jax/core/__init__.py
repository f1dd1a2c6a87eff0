"""The layer under every stage: diffusion maths shared by training and sampling, the run
folder's checkpoint format, mesh/sharding and multi-process helpers, image conversion.

Nothing here imports another psa_jax package (see docs/ARCHITECTURE.md, tests/test_layering.py).
"""
