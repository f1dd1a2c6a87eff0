"""Building blocks shared by the UNet, the VAE and the text encoder (linen, NHWC inside).

Module names copy diffusers' attribute names (``norm1``, ``conv_shortcut``, ``downsamplers.0``)
so that :mod:`psa_jax.models.convert` needs no per-module rename. Weights carry logical axis
names (``"embed"``, ``"heads"``, ``"mlp"``, ``"conv_in"``, ...); which mesh axis each maps to is
decided by the config's ``logical_axis_rules``, never here.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

Dtype = Any

# torch.nn.Linear/Conv2d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
# Used where a trained value does not replace the init (the PSA user projection), and elsewhere
# so that freshly initialised tiny models behave like their PyTorch twins.
_torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (batch) dimension to the ``act_batch`` logical axis, the rest
    replicated: what keeps XLA's partitioner from running a block on the whole global batch
    when its weights are split over ``fsdp``. A no-op (``x`` itself) unless traced under a mesh
    and logical-axis rules (``core.parallel.with_logical_axes``; the trainer's step does)."""
    return nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1))


@functools.cache
def _weight_dot(axes: tuple[str | None, ...]) -> Any:
    """``lax.dot_general`` for a dense layer whose kernel has logical ``axes``.

    Under a mesh and rules (as :func:`constrain_batch`) the kernel is pinned to its own
    sharding where it is used, inside a ``jax.checkpoint``: a kernel split over ``fsdp`` is
    gathered for this product and gathered again for the backward pass, instead of one
    gathered copy of every dense weight staying live from the forward pass to the backward
    (XLA did that without it, with or without remat: +0.8 GiB per device for SD1.5 at fsdp 2).
    ``prevent_cse=False``: with the default optimisation barrier, XLA:CPU kept far more of a
    remat'd block's recomputation live (SD1.5 512 px, remat "full": 9.3 -> 12.8 GiB on one
    device). Elsewhere exactly ``lax.dot_general``.
    """

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        def dot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
            return jax.lax.dot_general(lhs, nn.with_logical_constraint(rhs, axes),
                                       dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)  # fmt: skip

        if not (meta.global_mesh_defined() and nn.get_logical_axis_rules()):
            return dot(lhs, rhs)  # no mesh: the constraint is a no-op
        return jax.checkpoint(dot, prevent_cse=False)(lhs, rhs)

    return dot_general


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """``nn.Dense`` with logical axis names on its kernel (and the bias on ``axes[1]``)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(_torch_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        dot_general=_weight_dot(tuple(axes)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """NHWC convolution with PyTorch's symmetric padding (default: same-size for odd kernels)."""
    pad = kernel_size // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            _torch_kernel_init, (None, None, "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


# Shared by both norms. Two-pass variance (use_fast_variance=False): the fast E[x^2]-E[x]^2
# form costs ~1e-6 relative error against PyTorch.
_NORM_KW = dict(
    use_fast_variance=False,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
)


def group_norm(groups: int, eps: float, *, dtype: Dtype = jnp.float32, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name, **_NORM_KW)


def layer_norm(eps: float = 1e-5, *, dtype: Dtype = jnp.float32, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, **_NORM_KW)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding as diffusers' ``get_timestep_embedding`` -> ``[B, dim]`` float32."""
    half = dim // 2
    # Frequencies are trace-time constants, rounded once to float32 as PyTorch's exp does.
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ``model.attention``: how the UNet's attention is computed. "xla": XLA's softmax(QK^T)V (every
# backend; on a CPU in the form XLA:CPU runs fastest, ``_cpu_attention``); "cudnn": cuDNN's
# fused flash attention (``jax.nn.dot_product_attention``), an error where it does not apply;
# "auto": cuDNN where it applies, XLA elsewhere, each fallback logged.
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN's flash attention (SD1.5's 160-wide heads do not qualify)


def attention_implementation(
    requested: str, dtype: Any, head_dim: int, platform: str | None = None
) -> tuple[str, str | None]:
    """``(implementation, why_not_cudnn)`` for attention in ``dtype`` with ``head_dim``-wide heads
    on ``platform`` ("cuda", "rocm", "cpu", "tpu"; default: JAX's default backend).
    ``requested`` is one of :data:`ATTENTION_IMPLS`; only "auto" chooses, and its reason is
    None when it chose cuDNN."""
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {requested!r}; choose one of {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested, None
    platform = platform or _default_platform()
    if platform != "cuda":
        return "xla", f"the backend is {platform}, not a CUDA GPU"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return "xla", f"{jnp.dtype(dtype).name} (cuDNN takes bfloat16/float16)"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return "xla", f"head dim {head_dim} (cuDNN: a multiple of 8, at most 128)"
    return "cudnn", None


def _default_platform() -> str:
    """JAX's default backend, with a GPU named by its runtime ("cuda" or "rocm")."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


@functools.cache
def _log_fallback(reason: str) -> None:
    """Once per reason and process: "auto" attention that runs XLA says why."""
    import logging

    logging.getLogger(__name__).info("attention 'auto': XLA instead of cuDNN where %s", reason)


def sdpa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head scaled dot-product attention on ``[B, L, heads*dim]`` tensors;
    ``implementation``: one of :data:`ATTENTION_IMPLS`, resolved where this is traced."""
    b, lq, inner = q.shape
    impl, why = attention_implementation(implementation, q.dtype, inner // heads)
    if why is not None:  # only "auto" gives a reason
        _log_fallback(why)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, inner // heads)  # noqa: E731
    if impl == "xla" and mask is None and not is_causal and _default_platform() == "cpu":
        out = _cpu_attention(split(q), split(k), split(v))
    else:
        out = jax.nn.dot_product_attention(
            split(q), split(k), split(v), mask=mask, is_causal=is_causal, implementation=impl
        )
    return out.reshape(b, lq, inner)


# A head's score matrix from this many entries up is computed one head at a time on a CPU.
CPU_HEAD_LOOP_MIN_SCORES = 512 * 512


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The "xla" attention as XLA:CPU runs it fastest, on ``[B, L, heads, dim]``: heads-major
    scores, softmax normalised after the value product (on ``[.., L, dim]`` instead of
    ``[.., L, L]``). Once a head's score matrix is large, one head at a time
    (:func:`_looped_attention`). The same math as ``jax.nn.dot_product_attention``'s XLA path,
    to float rounding. Measured on 2 cores (fwd+bwd against jax.nn's): 256 tokens x 8-wide
    heads 1.3-2.1x, 1024 x 40-wide 2.9x, 4096 x 40-wide 2.5x faster (BENCHMARKS.md).
    """
    qh, kh, vh = (x.transpose(2, 0, 1, 3) for x in (q, k, v))  # [heads, B, L, dim]
    if q.shape[1] * k.shape[1] >= CPU_HEAD_LOOP_MIN_SCORES:
        out = _looped_attention(qh, kh, vh)
    else:
        out = _head_forward(qh, kh, vh, keep_probabilities=True)[0]
    return out.transpose(1, 2, 0, 3)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    return jnp.einsum("...qd,...kd->...qk", q * scale, k, preferred_element_type=jnp.float32)


def _head_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, keep_probabilities: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(output, log-sum-exp of the scores)``. With ``keep_probabilities`` autodiff keeps
    ``exp(scores - max)`` for the backward (the max only shifts: no gradient through it)."""
    s = _scores(q, k)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - (jax.lax.stop_gradient(m) if keep_probabilities else m))
    total = e.sum(-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / total).astype(q.dtype), m + jnp.log(total)


def _head_backward(q, k, v, o, lse, do) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention's vjp from the probabilities recomputed out of ``lse`` (flash attention's
    backward, one whole score matrix at a time)."""
    f32 = jnp.float32
    p = jnp.exp(_scores(q, k) - lse)
    dv = jnp.einsum("...qk,...qd->...kd", p.astype(do.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("...qd,...kd->...qk", do, v, preferred_element_type=f32)
    ds = (p * (dp - (o.astype(f32) * do.astype(f32)).sum(-1, keepdims=True))).astype(q.dtype)
    scale = q.shape[-1] ** -0.5
    dq = jnp.einsum("...qk,...kd->...qd", ds, k, preferred_element_type=f32) * scale
    dk = jnp.einsum("...qk,...qd->...kd", ds, q * scale, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@jax.custom_vjp
def _looped_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array) -> jax.Array:
    """Heads-major ``[heads, B, L, dim]`` attention one head at a time (``lax.map``, batch
    inside, so a sharded batch stays sharded): each pass over a head's scores stays in cache.
    Its backward keeps only the output and a log-sum-exp per row and recomputes a head's
    probabilities when it needs them: autodiff of the loop would stack every head's
    probabilities, and XLA:CPU zero-fills that stack from a broadcast shared by every loop of
    that shape, live all step (SD1.5 512 px: 1 GiB more; docs/scaling.md). Measured (2 images,
    8 heads of 40, fwd+bwd): 1.2x faster than autodiff of the loop, a quarter to a third of its
    temporaries."""
    return _looped_forward(qh, kh, vh)[0]


def _looped_forward(qh, kh, vh):
    o, lse = jax.lax.map(lambda x: _head_forward(*x), (qh, kh, vh))
    return o, (qh, kh, vh, o, lse)


def _looped_backward(residuals, do):
    return jax.lax.map(lambda x: _head_backward(*x), (*residuals, do))


_looped_attention.defvjp(_looped_forward, _looped_backward)


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="linear_1")(x)
        x = nn.silu(x)
        return dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm="default", pre-norm, SiLU)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        x = constrain_batch(x)
        h = group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x)
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(nn.silu(h))
        if temb is not None:
            t = dense(
                self.out_channels, ("embed", "conv_out"), dtype=self.dtype, name="time_emb_proj"
            )
            h = h + t(nn.silu(temb))[:, None, None, :]
        h = group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h)
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain_batch(out)


class Downsample2D(nn.Module):
    """Strided 3x3 conv. ``padding=0`` pads right/bottom first, as the VAE encoder does."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        c = conv(
            self.out_channels, 3, stride=2, padding=self.padding, dtype=self.dtype, name="conv"
        )
        return c(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """PyTorch ``F.interpolate(mode="nearest")`` on NHWC: x2, or to ``size``."""
    h, w = x.shape[1:3]
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to a given size) then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, size)
        return conv(self.out_channels, 3, dtype=self.dtype, name="conv")(x)
