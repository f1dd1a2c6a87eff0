"""PyTorch state dicts <-> Flax parameter trees.

Our Flax modules carry diffusers'/transformers' module names verbatim (list entries are named
``"resnets.0"``), so a Flax path and a PyTorch key share everything but the leaf. Conversion is
therefore one table, ``LEAF_RULES``, mapping each Flax leaf name to its PyTorch name and the
layout change between them. The expected Flax tree (from ``jax.eval_shape`` of ``init``) drives
the conversion, so a missing, unexpected or mis-shaped key is always named in the error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import numpy as np

from psa_jax.core.errors import PsaJaxError

Params = dict[str, Any]


class WeightMismatchError(PsaJaxError, ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [f"{what} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        for key, got, want in self.mismatched[:20]:
            lines.append(f"  shape mismatch for {key}: checkpoint {got}, model expects {want}")
        if len(self.mismatched) > 20:
            lines.append(f"  ... and {len(self.mismatched) - 20} more shape mismatches")
        super().__init__("\n".join(lines))


def _short(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _kernel_to_flax(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # Conv2d OIHW -> HWIO
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 2:  # Linear [out, in] -> [in, out]
        return np.transpose(w)
    raise ValueError(f"cannot convert a {w.ndim}-d weight to a Flax kernel")


def _kernel_to_torch(k: np.ndarray) -> np.ndarray:
    if k.ndim == 4:
        return np.transpose(k, (3, 2, 0, 1))
    if k.ndim == 2:
        return np.transpose(k)
    raise ValueError(f"cannot convert a {k.ndim}-d Flax kernel to a PyTorch weight")


def _same(x: np.ndarray) -> np.ndarray:
    return x


class LeafRule(NamedTuple):
    torch_name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# The whole rename table: Flax leaf -> PyTorch leaf and the per-leaf layout transform.
LEAF_RULES: dict[str, LeafRule] = {
    "kernel": LeafRule("weight", _kernel_to_flax, _kernel_to_torch),  # Linear / Conv
    "bias": LeafRule("bias", _same, _same),
    "scale": LeafRule("weight", _same, _same),  # LayerNorm / GroupNorm
    "embedding": LeafRule("weight", _same, _same),  # nn.Embedding
}


def torch_key(path: tuple[str, ...]) -> str:
    """PyTorch state-dict key of the Flax leaf at ``path``."""
    *modules, leaf = path
    if leaf not in LEAF_RULES:
        raise KeyError(f"no conversion rule for Flax leaf {'/'.join(path)!r}")
    return ".".join([*modules, LEAF_RULES[leaf].torch_name])


def flat_leaves(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """Flatten a nested param dict (boxes from ``nn.with_logical_partitioning`` unboxed)."""
    return flax.traverse_util.flatten_dict(flax.core.meta.unbox(flax.core.unfreeze(tree)))


def torch_to_flax(
    state_dict: Mapping[str, Any],
    reference: Mapping[str, Any],
    *,
    what: str = "checkpoint",
    ignore: Iterable[str] = (),
    dtype: Any = None,
) -> Params:
    """Convert a PyTorch state dict to the Flax tree shaped like ``reference``.

    Args:
      state_dict: key -> array (numpy or torch); keys as ``module.state_dict()`` writes them.
      reference: the expected Flax params (arrays or ``jax.ShapeDtypeStruct``), e.g. from
        ``jax.eval_shape(model.init, ...)["params"]``.
      what: names the checkpoint in errors.
      ignore: regexes of PyTorch keys to drop silently (non-persistent buffers such as
        ``position_ids``); every other key must be used.
      dtype: cast every leaf to this dtype (default: the reference's dtype).

    Raises:
      WeightMismatchError: naming every missing, unexpected and mis-shaped key.
    """
    ignore_re = [re.compile(p) for p in ignore]
    out: dict[tuple[str, ...], np.ndarray] = {}
    used, missing, mismatched = set(), [], []
    for path, ref in flat_leaves(reference).items():
        key = torch_key(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = LEAF_RULES[path[-1]].to_flax(to_numpy(state_dict[key]))
        if tuple(value.shape) != tuple(ref.shape):
            want = LEAF_RULES[path[-1]].to_torch(np.empty(ref.shape, np.int8)).shape
            mismatched.append((key, tuple(state_dict[key].shape), tuple(want)))
            continue
        out[path] = value.astype(dtype or ref.dtype)
    unexpected = [
        k for k in state_dict if k not in used and not any(r.fullmatch(k) for r in ignore_re)
    ]
    if missing or unexpected or mismatched:
        raise WeightMismatchError(what, missing, unexpected, mismatched)
    return flax.traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: a PyTorch-layout state dict of numpy arrays."""
    out = {}
    for path, value in flat_leaves(params).items():
        value = np.asarray(jax.device_get(value))
        if dtype is not None:
            value = value.astype(dtype)
        out[torch_key(path)] = np.ascontiguousarray(LEAF_RULES[path[-1]].to_torch(value))
    return out


# ----------------------------------------------------------------------------------------------
# Reading and writing checkpoint files.


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/JAX/torch array; bf16 stays bf16 through ml_dtypes."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file, a sharded ``*.index.json`` or a PyTorch ``.bin``/``.pt``.

    ``.bin`` files are read with ``torch.load(weights_only=True)`` (no pickle code runs).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: to_numpy(f.get_tensor(k)) for k in f.keys()}
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: to_numpy(v) for k, v in flatten_nested(obj).items()}


def flatten_nested(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": t}}`` -> ``{"a.b": t}`` (PSAlign's .bin nests its two state dicts)."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            out.update(flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_safetensors(
    state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None
) -> None:
    """Write numpy arrays (bf16 included) as a safetensors file PyTorch can read."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state_dict.items():
        # A C-ordered copy when needed: torch refuses read-only views of JAX buffers, and
        # safetensors refuses non-contiguous (e.g. transposed) arrays.
        v = np.asarray(v)
        if not (v.flags.writeable and v.flags.c_contiguous):
            v = np.array(v, order="C")
        if v.dtype.name == "bfloat16":
            tensors[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
        else:
            tensors[k] = torch.from_numpy(v)
    save_file(tensors, os.fspath(path), metadata=metadata)


def find_weights_file(folder: str | os.PathLike, stem: str, variant: str | None = None) -> str:
    """Locate ``stem[.variant].safetensors`` (or its sharded index, or ``.bin``) in a folder."""
    folder = os.fspath(folder)
    suffix = f".{variant}" if variant else ""
    candidates = [
        f"{stem}{suffix}.safetensors",
        f"{stem}.safetensors.index{suffix}.json",
        f"{stem}{suffix}.safetensors.index.json",
        f"{stem}{suffix}.bin",
        f"{stem}{suffix}.bin.index.json",
    ]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(candidates)}")


def component_folder(folder: str | os.PathLike, subfolder: str) -> str:
    """``folder`` itself if it holds a ``config.json``, else a diffusers pipeline's
    ``folder/subfolder`` (``unet``, ``vae``, ``text_encoder``) when that one does."""
    folder = os.fspath(folder)
    nested = os.path.join(folder, subfolder)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(nested, "config.json")
    ):
        return nested
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} has no config.json (expected a diffusers/transformers folder)"
        )
    with open(path) as f:
        return json.load(f)
