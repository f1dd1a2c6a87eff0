"""Host-side per-step tables of the samplers in :mod:`psa_jax.sample.schedulers`.

Each ``*_tables(acp, n, options)`` reproduces one diffusers scheduler's ``set_timesteps`` and the
scalar coefficients of its ``step`` in numpy float32, in diffusers' operation order, and returns
``(timesteps, tables, init_sigma, static_fields)``. Kept apart from the traced step code: this
runs once per schedule on the host, never under ``jit``. Accuracy against diffusers is discussed
in :mod:`psa_jax.sample.schedulers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_f32 = np.float32
SPACINGS = ("leading", "trailing", "linspace")


def _log(x: np.ndarray) -> np.ndarray:
    """In float64 and rounded once (as ``_exp``): correctly rounded, unlike numpy's float32 log."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(_f32)


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(x, np.float64)).astype(_f32)


def _spaced(spacing: str, T: int, n: int, offset: int, *, dpm_last: int | None = None, **kw):
    """``set_timesteps``' numpy code (float64, then cast) as each diffusers scheduler has it.

    DPM-Solver (``dpm_last`` given) spaces n + 1 points over ``[0, dpm_last)`` and drops the
    last; Euler (``round_linspace=False``) keeps linspace's fractional float32 timesteps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose from {list(SPACINGS)}")
    m, top = (n, T) if dpm_last is None else (n + 1, dpm_last)
    if spacing == "trailing":
        return np.arange(top, 0, -T / n).round().astype(np.int64) - 1
    if spacing == "linspace" and not kw.get("round_linspace", True):
        return np.linspace(0, T - 1, n, dtype=_f32)[::-1].copy()
    if spacing == "linspace":
        ts = np.linspace(0, top - 1, m).round()[::-1].astype(np.int64)
    else:
        ts = (np.arange(0, m) * (top // m)).round()[::-1].astype(np.int64) + offset
    return ts if dpm_last is None else ts[:-1]


def _check_timesteps(ts: np.ndarray, T: int) -> None:
    if ts.size == 0 or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T - 1}]; lower steps_offset")


def _clamp_terminal(acp: np.ndarray) -> np.ndarray:
    # Zero-terminal-SNR schedules end at acp = 0 (infinite sigma); Euler and DPM-Solver set it
    # to 2**-24 as diffusers does when rescale_betas_zero_snr is set.
    if acp[-1] != 0:
        return acp
    acp = acp.copy()
    acp[-1] = _f32(2**-24)
    return acp


def _final_sigma(kind: str, acp: np.ndarray) -> np.float32:
    if kind == "zero":
        return _f32(0)
    if kind == "sigma_min":
        return np.sqrt((1 - acp[0]) / acp[0])
    raise ValueError(f"unknown final_sigmas_type {kind!r}; choose from ['zero', 'sigma_min']")


def _inference_sigmas(ts: np.ndarray, acp: np.ndarray, final_sigmas_type: str) -> np.ndarray:
    """Train sigmas linearly interpolated at ``ts`` (np.interp in float64), then the final one."""
    train = _clamp_terminal(acp)
    sig = np.interp(ts, np.arange(0, len(acp)), np.sqrt((1 - train) / train))
    return np.concatenate([sig, [_final_sigma(final_sigmas_type, acp)]]).astype(_f32)


def ddpm_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"])
    _check_timesteps(ts, T)
    prev = np.concatenate([ts[1:], [-1]])  # diffusers' previous_timestep: the next in the list
    a_t = acp[ts]
    a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], _f32(1))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    if o["variance_type"] == "fixed_small":
        var = np.maximum((1 - a_prev) / (1 - a_t) * cur_beta, _f32(1e-20))
    elif o["variance_type"] == "fixed_large":
        var = cur_beta
    else:
        raise ValueError(f"variance_type {o['variance_type']!r}: use fixed_small or fixed_large")
    tables = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "c_x0": (np.sqrt(a_prev) * cur_beta) / b_t,
        "c_xt": np.sqrt(cur_alpha) * b_prev / b_t,
        "std": np.where(ts > 0, np.sqrt(var), _f32(0)),  # diffusers adds no noise at t == 0
    }
    return ts.astype(np.int32), tables, _f32(1), {"stochastic": True}


def ddim_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"])
    _check_timesteps(ts, T)
    prev = ts - T // n  # diffusers steps back by T // n whatever the spacing
    final = _f32(1) if o["set_alpha_to_one"] else acp[0]
    a_t = acp[ts]
    a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    var = (b_prev / b_t) * (1 - a_t / a_prev)
    eta = _f32(o["eta"])
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {o['eta']}")
    std = eta * np.sqrt(var)
    tables = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "sqrt_a_prev": np.sqrt(a_prev),
        "c_dir": np.sqrt(1 - a_prev - std * std),
        "std": std,
    }
    return ts.astype(np.int32), tables, _f32(1), {"stochastic": bool(eta > 0)}


def euler_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    spacing = o["timestep_spacing"]
    ts = _spaced(spacing, T, n, o["steps_offset"], round_linspace=False).astype(_f32)
    _check_timesteps(ts, T)
    sigmas = _inference_sigmas(ts, acp, o["final_sigmas_type"])
    s = sigmas[:-1]
    s2p1 = s * s + 1
    tables = {
        "sigma": s,
        "in_div": np.sqrt(s2p1),  # scale_model_input: sample / sqrt(sigma^2 + 1)
        "dt": sigmas[1:] - s,
        "c_out": -s / np.sqrt(s2p1),  # v-prediction: x0 = v c_out + sample / (sigma^2 + 1)
        "v_div": s2p1,
    }
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + 1)
    return ts, tables, init, {}


def dpm_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    order = o["solver_order"]
    if order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2 (DPM-Solver++ 2M), got {order}")
    clip = _f32(o["lambda_min_clipped"])
    last = T
    if np.isfinite(clip):  # -inf, the default, clips nothing
        a2 = _clamp_terminal(acp)
        lam_train = _log(np.sqrt(a2)) - _log(np.sqrt(1 - a2))
        last = T - int(np.searchsorted(lam_train[::-1], clip))
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"], dpm_last=last)
    _check_timesteps(ts, T)
    sigmas = _inference_sigmas(ts, acp, o["final_sigmas_type"])
    alpha = 1 / np.sqrt(sigmas * sigmas + 1)
    sig = sigmas * alpha
    lam = _log(alpha) - _log(sig)  # +inf at a final sigma of zero
    n = len(ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[1:] - lam[:-1]
        c_d0 = alpha[1:] * (_exp(-h) - 1)
        r0 = np.concatenate([[_f32(1)], lam[1:-1] - lam[:-2]]) / h
        c_r = 1 / r0
    idx = np.arange(n)
    low_final = (idx == n - 1) & (
        o["euler_at_final"]
        or (o["lower_order_final"] and n < 15)
        or o["final_sigmas_type"] == "zero"
    )
    second = (order == 2) & (idx >= 1) & ~low_final
    tables = {
        "alpha": alpha[:-1],  # x0 conversion at sigma_s0
        "sig": sig[:-1],
        "c_sample": sig[1:] / sig[:-1],
        "c_d0": c_d0,
        "c_d1": np.where(second, _f32(0.5) * c_d0, _f32(0)),  # zero: first-order step
        "c_r": np.where(second, c_r, _f32(0)),
    }
    return ts.astype(np.int32), tables, _f32(1), {}


def _pndm_calls(asc: np.ndarray, T: int, n: int, skip_prk: bool):
    """PNDM's model-call timesteps and, per call, the timestep its update is taken at, the
    previous timestep it goes to, and its counter (diffusers' ``self.counter``)."""
    ratio = T // n
    if skip_prk:  # PLMS: the first timestep twice (a second-order start), then one call a step
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
        eff, prev = ts.copy(), ts - ratio
        if len(ts) > 1:  # counter 1 redoes step 0's interval with the averaged output
            eff[1], prev[1] = ts[1] + ratio, ts[1]
        return ts, eff, prev
    if n < 4:
        raise ValueError(
            f"PNDM's Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= 4, "
            f"got {n}; set skip_prk_steps=True (PLMS)"
        )
    half = ratio // 2
    prk = np.asarray(asc[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    plms = asc[:-3][::-1]
    counters = np.arange(len(prk))
    eff = np.concatenate([prk[counters // 4 * 4], plms])
    prev = np.concatenate([prk - np.where(counters % 2, 0, half), plms - ratio])
    return np.concatenate([prk, plms]), eff, prev


def _pndm_program(n_calls: int, skip_prk: bool) -> dict[str, np.ndarray]:
    """Per call, how :func:`psa_jax.sample.schedulers._pndm_step` combines model outputs:
    ``kind`` (0 the output itself, 1 its mean with the stored one, 2-4 Adams-Bashforth of that
    order over the history, 5 the Runge-Kutta sum), whether the output joins the history
    (``push``), the sample is remembered (``set_cur``) or the remembered one is stepped from
    (``use_cur``), and the Runge-Kutta accumulator's weight (``acc_w``) and reset."""
    c = np.arange(n_calls)
    if skip_prk:
        kind = np.select([c == 0, c == 1, c == 2, c == 3], [0, 1, 2, 3], 4)
        return {
            "kind": kind,
            "push": c != 1,
            "set_cur": c == 0,
            "use_cur": c == 1,
            "acc_w": np.zeros(n_calls),
            "acc_reset": np.zeros(n_calls),
        }
    prk, r = c < 12, c % 4
    return {
        "kind": np.where(prk, np.where(r == 3, 5, 0), 4),
        "push": ~prk | (r == 0),
        "set_cur": prk & (r == 0),
        "use_cur": prk,
        "acc_w": np.where(prk & (r == 0), 1 / 6, np.where(prk & (r < 3), 1 / 3, 0)),
        "acc_reset": prk & (r == 3),
    }


def pndm_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    """``PNDMScheduler``: PLMS (``skip_prk_steps``, Stable Diffusion's) makes n + 1 model calls,
    the Runge-Kutta warm-up 12 calls over the last 4 timesteps and then n - 3 PLMS calls.
    Its ``set_timesteps`` spaces ascending: our descending spacing reversed."""
    T = len(acp)
    asc = _spaced(o["timestep_spacing"], T, n, o["steps_offset"])[::-1]
    _check_timesteps(asc, T)
    skip_prk = bool(o["skip_prk_steps"])
    ts, eff, prev = _pndm_calls(asc, T, n, skip_prk)
    _check_timesteps(eff, T)
    final = _f32(1) if o["set_alpha_to_one"] else acp[0]
    a_t = acp[eff]
    a_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    tables = {
        "sqrt_a": np.sqrt(a_t),  # v-prediction -> epsilon
        "sqrt_b": np.sqrt(b_t),
        "c_sample": np.sqrt(a_prev / a_t),
        "c_num": a_prev - a_t,
        "denom": a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
        **_pndm_program(len(ts), skip_prk),
    }
    return ts.astype(np.int32), tables, _f32(1), {}
