"""Held-out metrics during training: fixed batches and fixed rngs, so the numbers compare across
steps and runs. ``make_evaluator`` reads a run's inputs and state by attribute (the trainer's
``RunInputs`` / ``RunState``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from psa_jax.core import parallel
from psa_jax.data import prepare
from psa_jax.data.loader import make_global_batch
from psa_jax.train.step import step_inputs


def evaluate_batches(eval_fns, state, frozen, batches, mesh, draws: int) -> dict[str, float]:
    """Held-out metrics over fixed batches with fixed rngs (comparable across steps and runs).

    ``eval/<metric>``: the training metrics, one (noise, timestep) draw per pair.
    ``eval/pair_acc``: share of pairs whose reward margin, averaged over ``draws`` draws, is
    positive (ties half) -- the sign of the expected implicit reward, far less noisy than one
    draw. A run evaluates at step 0 too, so that the curve starts at the untrained value.
    """
    metrics_fn, margins_fn = eval_fns
    totals: dict[str, float] = {}
    right = count = 0
    for i, batch in enumerate(batches):
        gb = make_global_batch(batch, mesh, PartitionSpec(parallel.BATCH_AXES))
        m = jax.device_get(metrics_fn(state.params, frozen, gb, jax.random.PRNGKey(10_000 + i)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        if margins_fn is not None:
            keys = [jax.random.PRNGKey(20_000 + draws * i + k) for k in range(draws)]
            mean = np.mean([np.asarray(margins_fn(state.params, frozen, gb, k)) for k in keys], 0)
            # A tie (an adapter still at its zero init: policy == reference) counts half.
            hits = float(np.sum(mean > 0)) + 0.5 * float(np.sum(mean == 0))
            right, count = right + hits, count + mean.size
    if count:
        totals["pair_acc"] = right / count
    return totals


def make_evaluator(config: Any, inputs: Any, run: Any) -> Callable | None:
    """``evaluate(state) -> metrics`` over fixed held-out batches (see
    :func:`evaluate_batches`), or None without an eval split or ``train.eval_every``."""
    tcfg = config.train
    if not (config.data.eval_split and tcfg.eval_every):
        return None
    split = config.data.eval_split
    caches = prepare.open_caches(config, inputs.models, inputs.splits, split, inputs.with_vae)
    loader = prepare.make_loader(config, inputs.splits, split, caches,
                                 int(tcfg.eval_batch_size), seed=int(config.seed), shuffle=True,
                                 num_epochs=1)  # fmt: skip
    batches = [step_inputs(next(loader)) for _ in range(int(tcfg.eval_batches))]
    task, sh = run.setup.task, run.shardings

    def metrics_fn(p, f, b, r):
        loss, m = task.loss(p, f, b, r)
        return {**m, "loss": loss}

    shardings = (sh["state"].params, sh["frozen"], sh["batch"], sh["replicated"])

    def jit(fn: Callable) -> Callable:  # traced as the train step is (activation constraints)
        return jax.jit(parallel.under_mesh_rules(fn, run.mesh, config.mesh), in_shardings=shardings)

    margins = getattr(task, "margins", None)
    fns = (jit(metrics_fn), None if margins is None else jit(margins))
    draws = int(tcfg.eval_draws)
    return lambda state: evaluate_batches(fns, state, run.frozen, batches, run.mesh, draws)
