"""LoRA on the frozen base UNet's attention projections, as pure functions over pytrees.

LoRA here is functional: the trainable tree is ``{module: {"down": [in, r], "up": [r, out]}}``
and the loss calls ``merge_lora(params, lora, scale)`` before applying the unchanged UNet.
The frozen base stays one tree (shared, never copied or boxed into the module), the trainable
tree is tiny, and ``jax.grad`` w.r.t. ``lora`` computes gradients for the adapters only.
Merging costs one ``[in, r] @ [r, out]`` per target per step, which is negligible next to the
UNet forward pass.

Module keys are the PyTorch module paths (the Flax path joined by dots, through
:func:`psa_jax.models.convert.torch_key`), e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. Exported files use diffusers'
PEFT naming and metadata, so ``UNet2DConditionModel.load_lora_adapter(path, prefix="unet")``
and ``StableDiffusionPipeline.load_lora_weights`` apply the same ``alpha / rank`` scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from psa_jax.models import convert

Lora = dict[str, dict[str, jax.Array]]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_ATTN = ("attn1", "attn2")
PREFIX = "unet"  # diffusers' key prefix for the UNet in pipeline LoRA files
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FORMATS = ("peft",)


def _module_name(path: tuple[str, ...]) -> str:
    return convert.torch_key((*path, "kernel")).removesuffix(".weight")


def _kernels(params: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Module name -> Flax module path, for every Dense/Conv kernel in ``params``."""
    return {
        _module_name(path[:-1]): path[:-1]
        for path in convert.flat_leaves(params)
        if path[-1] == "kernel"
    }


def lora_targets(
    params: Mapping[str, Any],
    targets: Sequence[str] = DEFAULT_TARGETS,
    attn: Sequence[str] = DEFAULT_ATTN,
) -> list[tuple[str, ...]]:
    """Sorted Flax module paths (no trailing ``"kernel"``) of the attention Denses to adapt."""
    found = sorted(
        path[:-1]
        for path, leaf in convert.flat_leaves(params).items()
        if len(path) >= 3
        and path[-1] == "kernel"
        and path[-2] in targets
        and path[-3] in attn
        and len(leaf.shape) == 2
    )
    if not found:
        raise ValueError(f"no Dense named {tuple(targets)} inside attention modules {tuple(attn)}")
    return found


def init_lora(
    params: Mapping[str, Any],
    rank: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    rng: jax.Array,
    attn: Sequence[str] = DEFAULT_ATTN,
) -> Lora:
    """Fresh float32 LoRA: ``down`` as PEFT inits ``lora_A`` (kaiming_uniform, a=sqrt(5), i.e.
    U(+-1/sqrt(in))), ``up`` zero, so the merged model equals the base. ``params`` may be
    abstract (``jax.ShapeDtypeStruct`` leaves) or boxed."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    flat = convert.flat_leaves(params)
    paths = lora_targets(params, targets, attn)
    out = {}
    for key, path in zip(jax.random.split(rng, len(paths)), paths, strict=True):
        d_in, d_out = flat[(*path, "kernel")].shape
        bound = 1.0 / np.sqrt(d_in)
        out[_module_name(path)] = {
            "down": jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound),
            "up": jnp.zeros((rank, d_out), jnp.float32),
        }
    return out


def lora_scale(rank: int, alpha: float) -> float:
    """PEFT's (non-rslora) scale ``alpha / rank``."""
    return float(alpha) / rank


def _set_in(tree: Mapping[str, Any], path: tuple[str, ...], fn) -> dict[str, Any]:
    """Copy of ``tree`` with the leaf at ``path`` replaced by ``fn(leaf)``; siblings shared."""
    head, *rest = path
    new = dict(tree)
    new[head] = _set_in(tree[head], tuple(rest), fn) if rest else fn(tree[head])
    return new


def merge_lora(params: Mapping[str, Any], lora: Lora, scale: float | jax.Array) -> dict[str, Any]:
    """``params`` with ``kernel + scale * down @ up`` for every LoRA entry (float32 math, cast
    back to the kernel's dtype). Boxed kernels stay boxed; every other leaf is shared."""
    index = _kernels(params)
    for name, ab in lora.items():
        if name not in index:
            raise KeyError(f"LoRA module {name!r} is not a Dense/Conv kernel of the UNet params")

        def add(leaf, ab=ab, name=name):
            kernel = meta.unbox(leaf)
            down, up = ab["down"], ab["up"]
            if (down.shape[0], up.shape[1]) != kernel.shape or down.shape[1] != up.shape[0]:
                raise ValueError(
                    f"LoRA {name}: down {down.shape} @ up {up.shape} does not fit kernel "
                    f"{kernel.shape}"
                )
            delta = jnp.matmul(
                down.astype(jnp.float32),
                up.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
            return leaf.replace_boxed(merged) if isinstance(leaf, meta.AxisMetadata) else merged

        params = _set_in(params, (*index[name], "kernel"), add)
    return dict(params)


def export_lora(
    lora: Lora, path: str | os.PathLike, *, rank: int, alpha: float, format: str = "peft"
) -> str:
    """Write ``lora`` as diffusers' PEFT-format safetensors; returns the file written.

    Keys are ``unet.<module>.lora_A.weight`` ``[rank, in]`` and ``unet.<module>.lora_B.weight``
    ``[out, rank]`` (PyTorch layout; ``lora_B`` unscaled). ``alpha`` goes into the
    ``lora_adapter_metadata`` header (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``)
    that diffusers (0.42 checked) turns into the ``LoraConfig`` in ``load_lora_adapter`` and
    ``load_lora_weights``, so they scale by ``alpha / rank`` as we do. Loaders that ignore the
    header assume ``alpha == rank`` (scale 1). A folder ``path`` gets diffusers' default file
    name ``pytorch_lora_weights.safetensors``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choices: {', '.join(FORMATS)}")
    state = {}
    for name, ab in sorted(lora.items()):
        down, up = (np.asarray(jax.device_get(ab[k]), np.float32) for k in ("down", "up"))
        if down.shape[1] != rank or up.shape[0] != rank:
            raise ValueError(f"LoRA {name} has rank {down.shape[1]}, export was given {rank}")
        state[f"{PREFIX}.{name}.lora_A.weight"] = np.ascontiguousarray(down.T)
        state[f"{PREFIX}.{name}.lora_B.weight"] = np.ascontiguousarray(up.T)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(lora)}
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True),
    }
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    convert.write_safetensors(state, path, metadata=metadata)
    return path


def import_lora(path: str | os.PathLike) -> tuple[Lora, dict[str, float]]:
    """Read a file written by :func:`export_lora` (or any diffusers PEFT-format UNet LoRA with
    one rank) -> ``(lora, {"rank", "alpha"})``. Without the metadata header, ``alpha = rank``
    (diffusers' convention). Raises :class:`~psa_jax.WeightMismatchError` naming every missing
    or unexpected key."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    state = convert.read_state_dict(path)
    with safe_open(path, framework="np") as f:
        header = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
    pre = f"{PREFIX}."
    config = {k.removeprefix(pre): v for k, v in header.items() if k.startswith(pre)}
    suffixes = (".lora_A.weight", ".lora_B.weight")
    names = set(config.get("target_modules") or ())
    names |= {
        k[len(PREFIX) + 1 :].removesuffix(s)
        for k in state
        for s in suffixes
        if k.startswith(f"{PREFIX}.") and k.endswith(s)
    }
    if not names:
        raise ValueError(f"LoRA file {path} has no {PREFIX}.*.lora_A/B.weight keys")
    expected = {f"{PREFIX}.{n}{s}" for n in names for s in suffixes}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise convert.WeightMismatchError(f"LoRA file {path}", missing, unexpected)
    lora = {
        n: {
            "down": jnp.asarray(state[f"{PREFIX}.{n}.lora_A.weight"].T, jnp.float32),
            "up": jnp.asarray(state[f"{PREFIX}.{n}.lora_B.weight"].T, jnp.float32),
        }
        for n in sorted(names)
    }
    ranks = sorted({ab["down"].shape[1] for ab in lora.values()})
    if len(ranks) > 1 or config.get("r", ranks[0]) != ranks[0]:
        raise ValueError(f"LoRA file {path} has ranks {ranks}, header r={config.get('r')}")
    rank = ranks[0]
    return lora, {"rank": rank, "alpha": config.get("lora_alpha", rank)}
