"""Ablation sweeps: a sweep file (:mod:`~psa_jax.sweep.plan`), its runs here or on a cluster
(:mod:`~psa_jax.sweep.run`) and one report over them (:mod:`~psa_jax.sweep.report`)."""
