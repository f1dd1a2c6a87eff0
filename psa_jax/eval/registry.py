"""The scorer registry with psa_jax's own scorers in it: look a scorer up by name, check names.

Importing the implementations registers them (``@register`` in :mod:`psa_jax.eval.scorers`);
they import lazily so that checking names stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psa_jax.eval.scorers import SCORERS, ScorerContext, UnknownScorerError


def _load_builtin() -> None:
    # Importing the implementations registers them; kept lazy so `import scorers` is light.
    from psa_jax.eval import clip_scorers, fid, nudenet, toy  # noqa: F401


def get_scorer(name: str, context: ScorerContext | None = None, kind: str | None = None) -> Any:
    """Build the scorer registered as ``name`` (optionally checking its ``kind``)."""
    _load_builtin()
    spec = SCORERS.get(name)
    if spec is None or (kind is not None and spec.kind != kind):
        raise UnknownScorerError(name, kind)
    return spec.build(context or ScorerContext())


def check_names(names: Sequence[str]) -> dict[str, str]:
    """``{name: kind}`` of ``names``; an unknown one raises before anything expensive runs."""
    _load_builtin()
    out = {}
    for n in names:
        if n not in SCORERS:
            raise UnknownScorerError(n)
        out[n] = SCORERS[n].kind
    return out
