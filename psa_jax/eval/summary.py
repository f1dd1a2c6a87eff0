"""Per-group metrics (:mod:`psa_jax.eval.metrics`) of a scored evaluation, and their JSON.

Category-level metrics (banned / allowed marker rates, pass rates) need a scorer that names the 7
categories (``toy-oracle``); Q16 and NudeNet give IP only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psa_jax.eval import metrics as M
from psa_jax.eval.plans import BASE, PSA, EvalItem
from psa_jax.eval.scoring import Scored

PASS_ADHERENCE = "toy-adherence"  # the allowed-content check of the toy world's pass rate


def _own_rate(detected, items, idx, allowed: bool) -> float | None:
    """Own-marker rate over ``idx``'s prompts whose category the user allows (or bans)."""
    sel = [
        i
        for i in idx
        if items[i].category is not None
        and items[i].banned is not None
        and ((items[i].category in items[i].banned) != allowed)
    ]
    if not sel:
        return None
    return float(M.shows_own(detected[sel], [items[i].category for i in sel]).mean())


def group_summary(
    items: Sequence[EvalItem], idx: Sequence[int], scored: Mapping[str, Scored]
) -> dict[str, Any]:
    """Metrics of one group for the PSA model and the base (``scored[PSA]``, ``scored[BASE]``)."""
    idx = list(idx)
    users = sorted({items[i].user for i in idx if items[i].user})
    out: dict[str, Any] = {"images": len(idx), "users": len(users)}
    if len(users) == 1:
        out["user"] = users[0]
        out["banned"] = list(items[idx[0]].banned or [])
    for model, sc in scored.items():
        out[f"ip_{model}"] = M.inappropriate_probability(sc.flagged[idx])
        for name, s in sc.safety.items():
            out[f"flagged_{model}/{name}"] = float(s.flagged[idx].mean())
        for name, a in sc.adherence.items():
            out[f"adherence_{model}/{name}"] = float(a[idx].mean())
    for name in scored[PSA].safety:
        out[f"win_rate/{name}"] = M.win_rate(
            scored[PSA].safety[name].prob[idx], scored[BASE].safety[name].prob[idx], False
        )
    for name in scored[PSA].adherence:
        out[f"win_rate/{name}"] = M.win_rate(
            scored[PSA].adherence[name][idx], scored[BASE].adherence[name][idx], True
        )
        base = out[f"adherence_{BASE}/{name}"]
        out[f"adherence_ratio/{name}"] = M.safe_ratio(out[f"adherence_{PSA}/{name}"], base)
    known = [i for i in idx if items[i].banned is not None]
    if scored[PSA].detected is None or not known:
        return out
    for model, sc in scored.items():
        det = sc.detected
        out[f"marker_rates_{model}"] = M.marker_rates(det[idx])
        banned = [items[i].banned for i in known]
        out[f"banned_rate_{model}"] = float(M.shows_banned(det[known], banned).mean())
        out[f"banned_own_rate_{model}"] = _own_rate(det, items, idx, allowed=False)
        out[f"allowed_own_rate_{model}"] = _own_rate(det, items, idx, allowed=True)
        adh = sc.adherence.get(PASS_ADHERENCE)
        ok = M.image_passes(det[known], banned, None if adh is None else adh[known])
        rates = M.per_user_rates([items[i].user for i in known], ok)
        out[f"pass_rate_{model}"] = M.mean_of_users(rates)
    out["suppression_ratio"] = M.safe_ratio(
        out[f"banned_own_rate_{PSA}"], out[f"banned_own_rate_{BASE}"]
    )
    out["allowed_retention"] = M.safe_ratio(
        out[f"allowed_own_rate_{PSA}"], out[f"allowed_own_rate_{BASE}"]
    )
    return out


def summarize(items: Sequence[EvalItem], scored: Mapping[str, Scored]) -> dict[str, Any]:
    """Per-group summaries plus the level curves PSAlign plots (levels present only)."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group, []).append(i)
    summary = {g: group_summary(items, idx, scored) for g, idx in groups.items()}
    levels = [g for g in (f"level-{lv}" for lv in M.LEVELS) if g in summary]
    curves = {}
    if levels:
        for key in (
            "ip_psa",
            "ip_base",
            "banned_rate_psa",
            "banned_rate_base",
            "banned_own_rate_psa",
            "allowed_own_rate_psa",
            "pass_rate_psa",
        ):
            curves[key] = [summary[g].get(key) for g in levels]
        if "marker_rates_psa" in summary[levels[0]]:
            curves["any_marker_psa"] = [summary[g]["marker_rates_psa"]["any"] for g in levels]
            curves["any_marker_base"] = [summary[g]["marker_rates_base"]["any"] for g in levels]
    return {"groups": summary, "levels": levels, "level_curves": curves}


def to_json(obj: Any) -> str:
    """JSON with NaN/inf refused: a metric that cannot be computed is ``null``, never NaN."""
    return json.dumps(obj, indent=1, allow_nan=False, default=_plain)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
