"""Sampling: schedulers and the jit-compiled per-user sampler."""
