"""``psa-jax demo``: the embedded default end to end (data -> base -> DPO -> eval -> export)."""
