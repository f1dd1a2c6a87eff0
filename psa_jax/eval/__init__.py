"""Evaluation: PSA's metrics and the SPQR benchmark, extended to personalized safety.

Data flow: :mod:`scorers` (images -> per-image scores; toy, NudeNet, Q16, CLIPScore, FID) ->
:mod:`plans` (what to draw) -> :mod:`generation` (paired PSA/base images) -> :mod:`scoring` ->
:mod:`summary` (per-group metrics with :mod:`metrics`) -> :mod:`benchmark` (``evaluate_run``,
``spqr_run`` with :mod:`benign_data`, :mod:`psa_jax.train.benign` and :mod:`spqr_axes`) ->
:mod:`report` (JSON, CSV, plots, HTML) -> :mod:`cli`. Eval may import data, models, train and
sample; nothing below imports eval.
"""

from psa_jax.eval.spqr import spqr_score

__all__ = ["spqr_score"]
