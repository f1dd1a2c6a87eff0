"""PSA adapter tree <-> external adapter files (PSAlign, diffusers IP-Adapter).

Both formats index the cross-attention layers in diffusers' ``unet.attn_processors`` order
(down blocks, up blocks, mid block); :func:`psa_jax.models.adapter.adapter_layer_paths` gives
that order for our tree. Each format is a table of (file key, tree path, transform) rows used in
both directions, so import and export cannot drift apart.

* ``psalign``: ``user_proj.{proj,norm}.{weight,bias}`` and
  ``psa_adapter.<i>.to_{k,v}_user.0.weight`` (PSAlign's ``psa_adapter.bin`` flattened).
* ``diffusers-ip-adapter``: ``image_proj.{proj,norm}.*`` and
  ``ip_adapter.<2i+1>.to_{k,v}_ip.weight``.
  diffusers' ``ImageProjection`` always makes 4 tokens, so a T-token adapter (T in 1, 2, 4) is
  exported exactly by repeating each token's projection rows 4/T times: duplicated keys and
  values leave every attention output unchanged. Importing such a file into a T-token tree
  takes every (4/T)-th token back when the repeats are exact (the same adapter again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import numpy as np

from psa_jax.models.adapter import adapter_layer_paths
from psa_jax.models.convert import WeightMismatchError, flat_leaves

IP_ADAPTER_TOKENS = 4
FORMATS = ("psalign", "diffusers-ip-adapter")


class Row(NamedTuple):
    key: str  # key in the external file
    path: tuple[str, ...]  # leaf path in the adapter tree
    transposed: bool  # PyTorch Linear weight [out, in] vs our kernel [in, out]


def _table(layer_paths: list[tuple[str, ...]], fmt: str) -> list[Row]:
    if fmt == "psalign":
        proj, layer_key = "user_proj", "psa_adapter.{i}.to_{kv}_user.0.weight"
    elif fmt == "diffusers-ip-adapter":
        proj, layer_key = "image_proj", "ip_adapter.{j}.to_{kv}_ip.weight"
    else:
        raise ValueError(f"unknown adapter format {fmt!r}; choose one of {FORMATS}")
    rows = [
        Row(f"{proj}.proj.weight", ("user_proj", "kernel"), True),
        Row(f"{proj}.proj.bias", ("user_proj", "bias"), False),
        Row(f"{proj}.norm.weight", ("user_proj", "norm", "scale"), False),
        Row(f"{proj}.norm.bias", ("user_proj", "norm", "bias"), False),
    ]
    for i, path in enumerate(layer_paths):
        for kv in "kv":
            key = layer_key.format(i=i, j=2 * i + 1, kv=kv)
            rows.append(Row(key, (*path, f"to_{kv}_user", "kernel"), True))
    return rows


def detect_format(state_dict: Mapping[str, Any], *, what: str = "adapter file") -> str:
    """``psalign`` or ``diffusers-ip-adapter`` from the keys; anything else is an error naming
    ``what`` (the file)."""
    if any(k.startswith(("user_proj.", "psa_adapter.")) for k in state_dict):
        return "psalign"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in state_dict):
        return "diffusers-ip-adapter"
    sample = ", ".join(list(state_dict)[:5])
    raise WeightMismatchError(
        f"{what} (keys start {sample or 'nothing'})",
        missing=["user_proj.proj.weight (PSAlign) or image_proj.proj.weight (IP-Adapter)"],
    )


def adapter_shape(
    state_dict: Mapping[str, Any], cross_dim: int, *, what: str = "adapter file"
) -> tuple[int, int]:
    """(profile embedding dim D, user tokens T) of an adapter file (named ``what`` in errors)."""
    fmt = detect_format(state_dict, what=what)
    key = "user_proj.proj.weight" if fmt == "psalign" else "image_proj.proj.weight"
    if key not in state_dict:
        raise WeightMismatchError(f"{what} ({fmt})", missing=[key])
    shape = tuple(np.shape(state_dict[key]))
    if len(shape) != 2 or shape[0] == 0 or shape[0] % cross_dim:
        raise WeightMismatchError(
            f"{what} ({fmt})", mismatched=[(key, shape, (f"T*{cross_dim}", "D"))]
        )
    rows, d = shape
    return d, rows // cross_dim


def export_adapter(adapter: Mapping[str, Any], fmt: str) -> dict[str, np.ndarray]:
    """The adapter tree as a flat PyTorch-layout state dict in format ``fmt``."""
    leaves = {p: np.asarray(v, np.float32) for p, v in flat_leaves(adapter).items()}
    rows = _table(adapter_layer_paths(adapter), fmt)
    out = {}
    for row in rows:
        value = leaves[row.path]
        out[row.key] = np.ascontiguousarray(value.T if row.transposed else value)
    if fmt == "diffusers-ip-adapter":
        out.update(_tile_tokens(out, leaves[("user_proj", "norm", "scale")].shape[0]))
    return out


def _tile_tokens(sd: dict[str, np.ndarray], cross_dim: int) -> dict[str, np.ndarray]:
    w, b = sd["image_proj.proj.weight"], sd["image_proj.proj.bias"]
    t = w.shape[0] // cross_dim
    if IP_ADAPTER_TOKENS % t:
        raise ValueError(
            f"a {t}-token adapter cannot be exported exactly as diffusers' 4-token IP-Adapter "
            "(T must be 1, 2 or 4); export it with format='psalign' instead"
        )
    reps = IP_ADAPTER_TOKENS // t
    return {
        "image_proj.proj.weight": np.repeat(w.reshape(t, cross_dim, -1), reps, 0).reshape(
            IP_ADAPTER_TOKENS * cross_dim, -1
        ),
        "image_proj.proj.bias": np.repeat(b.reshape(t, cross_dim), reps, 0).reshape(-1),
    }


def _untile_tokens(sd: Mapping[str, Any], cross_dim: int, t: int) -> Mapping[str, Any]:
    """A 4-token IP-Adapter state dict whose tokens repeat ``t`` tokens 4/t times each (what
    :func:`_tile_tokens` wrote) with those ``t`` tokens; anything else unchanged (its shapes
    then mismatch, by name)."""
    w, b = sd.get("image_proj.proj.weight"), sd.get("image_proj.proj.bias")
    if w is None or b is None or t >= IP_ADAPTER_TOKENS or IP_ADAPTER_TOKENS % t:
        return sd
    w, b = np.asarray(w), np.asarray(b)
    if w.ndim != 2 or w.shape[0] != IP_ADAPTER_TOKENS * cross_dim or b.shape != (w.shape[0],):
        return sd
    reps = IP_ADAPTER_TOKENS // t
    w4, b4 = w.reshape(t, reps, cross_dim, -1), b.reshape(t, reps, cross_dim)
    if not (np.array_equal(w4, np.repeat(w4[:, :1], reps, 1))
            and np.array_equal(b4, np.repeat(b4[:, :1], reps, 1))):  # fmt: skip
        return sd
    return {
        **sd,
        "image_proj.proj.weight": w4[:, 0].reshape(t * cross_dim, -1),
        "image_proj.proj.bias": b4[:, 0].reshape(-1),
    }


def import_adapter(
    state_dict: Mapping[str, Any], reference: Mapping[str, Any], *, what: str = "adapter file"
) -> dict[str, Any]:
    """An external adapter state dict -> adapter tree shaped like ``reference`` (a diffusers
    IP-Adapter export of a T < 4 token adapter: its repeated tokens taken back).

    Raises:
      WeightMismatchError: naming missing, unexpected and mis-shaped keys.
    """
    fmt = detect_format(state_dict, what=what)
    ref = flat_leaves(reference)
    if fmt == "diffusers-ip-adapter":
        cross_dim = ref[("user_proj", "norm", "scale")].shape[0]
        t = ref[("user_proj", "kernel")].shape[1] // cross_dim
        state_dict = _untile_tokens(state_dict, cross_dim, t)
    rows = _table(adapter_layer_paths(reference), fmt)
    out, missing, mismatched = {}, [], []
    for row in rows:
        if row.key not in state_dict:
            missing.append(row.key)
            continue
        value = np.asarray(state_dict[row.key], np.float32)
        value = value.T if row.transposed else value
        want = tuple(ref[row.path].shape)
        if value.shape != want:
            mismatched.append(
                (
                    row.key,
                    tuple(np.shape(state_dict[row.key])),
                    want[::-1] if row.transposed else want,
                )
            )
            continue
        out[row.path] = value
    unexpected = sorted(set(state_dict) - {r.key for r in rows})
    if missing or unexpected or mismatched:
        raise WeightMismatchError(f"{what} ({fmt})", missing, unexpected, mismatched)
    return flax.traverse_util.unflatten_dict(out)
