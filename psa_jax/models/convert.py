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


class WeightFileError(PsaJaxError, ValueError):
    """A weights (or model config) file that cannot be read: the message names the file and
    what is wrong with it (garbage, truncated, empty, refused by ``torch.load``)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable despite the two-argument constructor
        return type(self), (self.path, self.problem)


class MissingWeightFileError(WeightFileError, FileNotFoundError):
    """A weights file (or model folder's file) that is not there; still a ``FileNotFoundError``."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes (torch bolds its advice)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of a library error (ANSI codes removed), shortened to its first
    sentence when long; the error's type name when it has no text (``EOFError()``)."""
    text = _ANSI.sub("", str(err))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) > limit:
        line = line.split(". ", 1)[0]
        line = line if len(line) <= limit else line[: limit - 3] + "..."
    return line or type(err).__name__


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

    Raises:
      MissingWeightFileError: no file at ``path`` (or at a shard an index lists).
      WeightFileError: the file is empty, garbage, truncated, not a state dict, or refused by
        ``torch.load(weights_only=True)``; the message names the file and the library's reason.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise WeightFileError(path, "is a folder, not a weights file")
    if not os.path.isfile(path):
        raise MissingWeightFileError(path, "no such weights file")
    if os.path.getsize(path) == 0:
        raise WeightFileError(path, "empty file (0 bytes), not a weights file")
    if path.endswith(".json"):
        return _read_sharded(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_torch(path)


def _read_sharded(index: str) -> dict[str, np.ndarray]:
    try:
        with open(index, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise WeightFileError(index, f"not valid JSON: {_first_line(err)}") from err
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightFileError(
            index, "not a sharded checkpoint index: no 'weight_map' object of key -> shard file"
        )
    shards = sorted(set(weight_map.values()))
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        shard_path = os.path.join(os.path.dirname(index), shard)
        if not os.path.isfile(shard_path):
            raise MissingWeightFileError(shard_path, f"no such shard (listed in {index})")
        out.update(read_state_dict(shard_path))
    return out


# safetensors dtypes that numpy holds natively: a file of only these is read without torch
# (whose import costs a CLI command 1-2 s); the bytes, dtypes and shapes are the same either way.
_NUMPY_SAFETENSORS = frozenset({"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            keys = list(f.keys())
            if all(f.get_slice(k).get_dtype() in _NUMPY_SAFETENSORS for k in keys):
                return {k: f.get_tensor(k) for k in keys}
        with safe_open(path, framework="pt") as f:  # bf16, fp8: through torch
            return {k: to_numpy(f.get_tensor(k)) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        size = os.path.getsize(path)
        raise WeightFileError(
            path,
            f"not a readable safetensors file ({size} bytes; garbage or truncated?): "
            f"{_first_line(err)}",
        ) from err


def _read_torch(path: str) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice to rerun with weights_only=False; the reason is
        # the line after "WeightsUnpickler error:".
        _, marker, reason = _ANSI.sub("", str(err)).partition("WeightsUnpickler error:")
        why = next((ln.strip() for ln in reason.splitlines() if ln.strip()), "") if marker else ""
        why = why.split(". Please use", 1)[0] if why else _first_line(err)
        raise WeightFileError(
            path,
            "torch.load(weights_only=True) refuses it (garbage, or a pickle holding more than "
            f"tensors; psa_jax never runs pickled code): {why}",
        ) from err
    except Exception as err:  # truncated or garbage: EOFError, RuntimeError, IndexError, ...
        raise WeightFileError(
            path,
            "torch.load(weights_only=True) cannot read it (garbage or truncated?): "
            f"{type(err).__name__}: {_first_line(err)}",
        ) from err
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            path, f"holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
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
    """Write numpy arrays (bf16 included) as a safetensors file PyTorch can read, with the
    permissions of any file the user creates (the umask's; safetensors itself leaves 0600,
    which colleagues on shared storage could not read).

    Arrays of numpy's own dtypes are written by ``safetensors.numpy`` (no torch import, the same
    bytes); a state dict holding bf16 goes through torch."""
    arrays = {}
    for k, v in state_dict.items():
        # A C-ordered copy when needed: torch refuses read-only views of JAX buffers, and
        # safetensors refuses non-contiguous (e.g. transposed) arrays.
        v = np.asarray(v)
        if not (v.flags.writeable and v.flags.c_contiguous):
            v = np.array(v, order="C")
        arrays[k] = v
    if all(v.dtype.name in _NUMPY_WRITE for v in arrays.values()):
        from safetensors.numpy import save_file as save_numpy

        save_numpy(arrays, os.fspath(path), metadata=metadata)
        _default_mode(path)
        return
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for k, v in arrays.items():
        if v.dtype.name == "bfloat16":
            tensors[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
        else:
            tensors[k] = torch.from_numpy(v)
    save_file(tensors, os.fspath(path), metadata=metadata)
    _default_mode(path)


def _default_mode(path: str | os.PathLike) -> None:
    """chmod a new file to 0666 minus the process umask, as ``open(path, "w")`` would make it."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which for a moment would apply to files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # elsewhere: briefly the strictest mask, never a looser one
    os.umask(mask)
    return mask


# numpy dtype names that safetensors.numpy writes under the names safetensors.torch uses.
_NUMPY_WRITE = frozenset(
    {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


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
    raise MissingWeightFileError(folder, f"no weights in it: looked for {', '.join(candidates)}")


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
        raise MissingWeightFileError(
            path, "no such file (expected a diffusers/transformers model folder)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise WeightFileError(path, f"not valid JSON: {_first_line(err)}") from err
    if not isinstance(config, dict):
        raise WeightFileError(path, f"holds a JSON {type(config).__name__}, not an object")
    return config
