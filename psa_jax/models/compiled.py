"""One compiled function per distinct model, shared by every wrapper object.

Linen modules are hashable dataclasses, so equal modules (same config, dtype, adapter shape)
map to the same ``jax.jit`` object and reuse its compilation cache: loading the same UNet twice,
or creating a second wrapper around new weights, costs no recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax


@functools.cache
def jitted_apply(module: nn.Module, method: str | None = None) -> Callable:
    """``jax.jit(module.apply)`` (optionally of a named method), memoised on the module."""
    if method is None:
        return jax.jit(module.apply)
    return jax.jit(functools.partial(module.apply, method=method))
