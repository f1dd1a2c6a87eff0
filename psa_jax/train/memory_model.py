"""Per-device memory and throughput model of the Diffusion-DPO train step (``docs/scaling.md``).

What one device holds while ``train_step(state, frozen, batch)`` runs, from the configs alone (no
weights, no compilation), so that a mesh and batch can be chosen before a pod is booked:

* the frozen base (``model.dtype``) and the adapter, its gradients and optimizer state (fp32),
  each sharded as ``config.mesh.logical_axis_rules`` and ``parallel.spec_for`` shard them;
* the batch rows of this device (the cached encoder outputs, fp32);
* activations: what the backward of the policy forward keeps, plus the largest working set of
  one layer's backward (see :func:`activation_bytes`).

``total`` is meant to equal what XLA reports as ``argument + output - alias + temp`` of the
compiled step (``tests/test_memory_model.py`` compares them on CPU). Activations are split with
the batch over data x fsdp, as the compiled step splits them (the modules constrain them to
``act_batch``; a dense kernel split over fsdp is gathered where it is used, not kept gathered
until the backward: docs/scaling.md). Throughput is FLOPs per pair over an assumed
MFU plus the gradient all-reduce (:func:`step_time`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from psa_jax.core import parallel
from psa_jax.models import layers
from psa_jax.models.unet import UNetConfig

F32 = 4  # bytes: adapter master weights, grads, optimizer moments, cached inputs, softmax scores
REMAT_MODELLED = ("none", "full")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One weight: its shape and logical axis names (as the module annotates it)."""

    shape: tuple[int, ...]
    names: tuple[str | None, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything the model reads: architecture, shapes, dtypes, remat, optimizer and mesh."""

    unet: UNetConfig
    user_embed_dim: int
    num_user_tokens: int = 1
    latent_side: int = 64  # latent pixels per side (image side / the VAE's 8)
    text_len: int = 77  # text tokens (CLIP)
    pooled_dim: int = 0  # SDXL's pooled text width; 0 without text_time conditions
    batch_per_device: int = 1  # DPO pairs per device per micro-batch
    accum_steps: int = 1
    param_bytes: int = 2  # frozen base dtype (bf16: 2)
    act_bytes: int = 2  # compute dtype of activations (bf16: 2)
    remat: str = "none"
    optimizer: str = "adamw"  # "adamw" | "adafactor"
    mesh: tuple[int, int, int] = (1, 1, 1)  # (data, fsdp, tensor)
    rules: tuple = ()  # logical-axis rules, as parallel.logical_rules returns them
    backend: str = "device"  # "device" (GPU/TPU) or "cpu" (XLA:CPU's attention form): BACKENDS

    @property
    def data_parallel(self) -> int:
        return self.mesh[0] * self.mesh[1]


# -- parameters ---------------------------------------------------------------------------------

_CONV = (None, None, "conv_in", "conv_out")


def _dense(din: int, dout: int, axes: tuple[str, str], bias: bool = True) -> list[Leaf]:
    out = [Leaf((din, dout), axes)]
    return [*out, Leaf((dout,), (axes[1],))] if bias else out


def _conv(cin: int, cout: int, k: int = 3) -> list[Leaf]:
    return [Leaf((k, k, cin, cout), _CONV), Leaf((cout,), ("conv_out",))]


def _norm(c: int) -> list[Leaf]:
    return [Leaf((c,), ("norm",)), Leaf((c,), ("norm",))]


def _resnet(cin: int, cout: int, temb: int) -> list[Leaf]:
    out = _norm(cin) + _conv(cin, cout) + _dense(temb, cout, ("embed", "conv_out"))
    out += _norm(cout) + _conv(cout, cout)
    return out + (_conv(cin, cout, 1) if cin != cout else [])


def _transformer(c: int, layers: int, ctx: int, linear: bool) -> list[Leaf]:
    if linear:  # proj_in, proj_out
        out = _norm(c) + _dense(c, c, ("embed", "heads")) + _dense(c, c, ("heads", "embed"))
    else:
        out = _norm(c) + _conv(c, c, 1) + _conv(c, c, 1)
    for _ in range(layers):
        for kv_in in (c, ctx):  # attn1 (self), attn2 (text)
            out += _dense(c, c, ("embed", "heads"), bias=False)  # to_q
            out += 2 * _dense(kv_in, c, ("embed", "heads"), bias=False)  # to_k, to_v
            out += _dense(c, c, ("heads", "embed"))  # to_out.0
        out += 3 * _norm(c)
        out += _dense(c, 8 * c, ("embed", "mlp")) + _dense(4 * c, c, ("mlp", "embed"))  # GEGLU
    return out


def _layer_count(cfg: UNetConfig, block: int, j: int) -> int:
    spec = cfg.transformer_layers[block]
    return int(spec[j] if isinstance(spec, (list, tuple)) else spec)


def base_leaves(cfg: UNetConfig) -> list[Leaf]:
    """Every frozen base weight, in no particular order (``UNet2DConditionModel``'s layout)."""
    ch, temb, ctx = cfg.block_out_channels, cfg.time_embed_dim, cfg.cross_attention_dim
    linear = cfg.use_linear_projection
    out = _dense(ch[0], temb, ("embed", "mlp")) + _dense(temb, temb, ("mlp", "embed"))
    if cfg.addition_embed_type == "text_time":
        out += _dense(cfg.projection_class_embeddings_input_dim, temb, ("embed", "mlp"))
        out += _dense(temb, temb, ("mlp", "embed"))
    out += _conv(cfg.in_channels, ch[0])
    c, skips = ch[0], [ch[0]]
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers[i]):
            out += _resnet(c, ch[i], temb)
            c = ch[i]
            if kind == "CrossAttnDownBlock2D":
                out += _transformer(c, _layer_count(cfg, i, j), ctx, linear)
            skips.append(c)
        if i < cfg.num_blocks - 1:
            out += _conv(c, c)
            skips.append(c)
    if cfg.mid_block_type is not None:
        out += _resnet(c, c, temb) + _transformer(c, _layer_count(cfg, -1, 0), ctx, linear)
        out += _resnet(c, c, temb)
    for i, kind in enumerate(cfg.up_block_types):
        src = cfg.num_blocks - 1 - i
        for j in range(cfg.layers[src] + 1):
            out += _resnet(c + skips.pop(), ch[src], temb)
            c = ch[src]
            if kind == "CrossAttnUpBlock2D":
                out += _transformer(c, _layer_count(cfg, src, j), ctx, linear)
        if i < cfg.num_blocks - 1:
            out += _conv(c, c)
    return out + _norm(c) + _conv(c, cfg.out_channels)


def _cross_attention_widths(cfg: UNetConfig) -> list[int]:
    """Inner width of every cross-attention layer (one ``attn2`` per transformer layer)."""
    widths = []
    for i, kind in enumerate(cfg.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            widths += [cfg.block_out_channels[i]] * sum(
                _layer_count(cfg, i, j) for j in range(cfg.layers[i])
            )
    if cfg.mid_block_type is not None:
        widths += [cfg.block_out_channels[-1]] * _layer_count(cfg, -1, 0)
    for i, kind in enumerate(cfg.up_block_types):
        src = cfg.num_blocks - 1 - i
        if kind == "CrossAttnUpBlock2D":
            widths += [cfg.block_out_channels[src]] * sum(
                _layer_count(cfg, src, j) for j in range(cfg.layers[src] + 1)
            )
    return widths


def adapter_leaves(cfg: UNetConfig, user_embed_dim: int, num_user_tokens: int = 1) -> list[Leaf]:
    """The PSA adapter: the user projection (Linear to T tokens + LayerNorm) and a bias-free
    ``to_k_user``/``to_v_user`` in every cross-attention layer (``models/adapter.py``)."""
    ctx = cfg.cross_attention_dim
    width = num_user_tokens * ctx
    out = [Leaf((user_embed_dim, width), ("user_embed", "embed")), Leaf((width,), ("embed",))]
    out += _norm(ctx)
    for c in _cross_attention_widths(cfg):
        out += 2 * [Leaf((ctx, c), ("embed", "heads"))]
    return out


def count(leaves: Sequence[Leaf]) -> int:
    return sum(leaf.size for leaf in leaves)


def sharded_bytes(leaves: Sequence[Leaf], itemsize: int, mesh: tuple[int, int, int],
                  rules: Sequence) -> int:  # fmt: skip
    """Bytes of ``leaves`` on one device: each dimension split over the mesh axes its logical
    name maps to, unless they do not divide it (then replicated), as ``parallel.spec_for``
    decides for the trainer."""
    abstract = jax.sharding.AbstractMesh(tuple(mesh), parallel.MESH_AXES)
    sizes = dict(zip(parallel.MESH_AXES, mesh))
    total = 0
    for leaf in leaves:
        spec = parallel.spec_for(leaf.shape, leaf.names, abstract, rules)
        split = math.prod(sizes[a] for axes in spec if axes for a in np.atleast_1d(axes))
        total += leaf.size // split * itemsize
    return total


def optimizer_state_elements(leaves: Sequence[Leaf], optimizer: str) -> int:
    """AdamW: two moments per weight. Adafactor (``optax.scale_by_factored_rms``, no momentum):
    a row and a column statistic for a weight whose two largest dims are >= 128, else a full
    second moment; the unused slots are 1-element placeholders."""
    if optimizer == "adamw":
        return 2 * count(leaves)
    if optimizer != "adafactor":
        raise ValueError(f"optimizer {optimizer!r} not modelled; one of ('adamw', 'adafactor')")
    total = 0
    for leaf in leaves:
        dims = sorted(leaf.shape)
        if len(dims) >= 2 and dims[-2] >= 128:
            total += leaf.size // dims[-2] + leaf.size // dims[-1] + 1
        else:
            total += leaf.size + 2
    return total


# -- activations --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One remat unit (or a layer between them), as the forward pass meets it, per image."""

    name: str
    kind: str  # "resnet" | "transformer" | "norm_out"
    tokens: int  # latent pixels at this level
    cin: int
    cout: int
    heads: int = 0
    layers: int = 0
    grad: str = "full"  # "none": before the first adapter use; "partial": holds it


def blocks(cfg: UNetConfig, side: int) -> Iterator[Block]:
    """The blocks whose backward can keep tensors, in forward order (convs in between keep
    nothing: their weights are frozen, so their input-gradient needs only the weight)."""
    ch = cfg.block_out_channels
    seen_adapter = False

    def transformer(name: str, s: int, c: int, block: int, layers: int) -> Block:
        nonlocal seen_adapter
        grad = "full" if seen_adapter else "partial"
        seen_adapter = True
        return Block(name, "transformer", s * s, c, c, cfg.heads[block], layers, grad)

    def resnet(name: str, s: int, cin: int, cout: int) -> Block:
        return Block(name, "resnet", s * s, cin, cout, grad="full" if seen_adapter else "none")

    s, c, skips = side, ch[0], [ch[0]]
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers[i]):
            yield resnet(f"down_blocks.{i}.resnets.{j}", s, c, ch[i])
            c = ch[i]
            if kind == "CrossAttnDownBlock2D":
                name = f"down_blocks.{i}.attentions.{j}"
                yield transformer(name, s, c, i, _layer_count(cfg, i, j))
            skips.append(c)
        if i < cfg.num_blocks - 1:
            s = (s + 1) // 2
            skips.append(c)
    if cfg.mid_block_type is not None:
        yield resnet("mid_block.resnets.0", s, c, c)
        yield transformer("mid_block.attentions.0", s, c, cfg.num_blocks - 1,
                          _layer_count(cfg, -1, 0))  # fmt: skip
        yield resnet("mid_block.resnets.1", s, c, c)
    for i, kind in enumerate(cfg.up_block_types):
        src = cfg.num_blocks - 1 - i
        for j in range(cfg.layers[src] + 1):
            yield resnet(f"up_blocks.{i}.resnets.{j}", s, c + skips.pop(), ch[src])
            c = ch[src]
            if kind == "CrossAttnUpBlock2D":
                name = f"up_blocks.{i}.attentions.{j}"
                yield transformer(name, s, c, src, _layer_count(cfg, src, j))
        if i < cfg.num_blocks - 1:
            s *= 2
    yield Block("conv_norm_out", "norm_out", s * s, c, c, grad="full" if seen_adapter else "none")


# Tensors the backward keeps, per pixel, in units of the block's channels, as XLA keeps them
# (read from its buffer assignment; docs/scaling.md):
#   ResnetBlock2D: each GroupNorm's input and each SiLU's input (2 cin + 2 cout);
#   a transformer layer: 2 full-size tensors per LayerNorm (x3), self-attention's q, k, v (3),
#   GEGLU's 8c projection and two 4c tensors: 16 (with jax.nn.gelu's erfc form, before
#   layers.gelu's erf form, three: 20; SDXL 1024 px's XLA peak fell 0.8 GiB with the change);
#   the Transformer2DModel's GroupNorm input (1 per block); the exp(logits - max) of self- and
#   cross-attention, per head and key, fp32 whatever the compute dtype.
_LAYER_NORMS, _QKV, _GEGLU = 6, 3, 16


def _looped(backend: str, queries: int, keys: int) -> bool:
    """Whether an attention runs one head at a time: on a CPU, for large score matrices
    (``layers._cpu_attention``); it keeps no scores (its backward recomputes them)."""
    return backend == "cpu" and queries * keys >= layers.CPU_HEAD_LOOP_MIN_SCORES


def _residual_elements(b: Block, text_len: int, user_tokens: int,
                       backend: str) -> tuple[int, int]:  # fmt: skip
    """``(activation elements, fp32 score elements)`` one image's forward keeps for ``b``."""
    n = b.tokens
    if b.grad == "none":
        return 0, 0
    if b.kind == "resnet":
        return n * 2 * (b.cin + b.cout), 0
    if b.kind == "norm_out":
        return n * 2 * b.cin, 0
    c, layer = b.cin, _LAYER_NORMS + _QKV + _GEGLU
    # Per layer: self-attention over the n pixels, cross-attention over the text, and over the
    # user tokens when there are several (one key: the probabilities are 1, nothing kept).
    key_sets = [n, text_len] + ([user_tokens] if user_tokens > 1 else [])
    keys = sum(k for k in key_sets if not _looped(backend, n, k))
    # A looped attention keeps its output and a log-sum-exp per head and row instead.
    looped = sum(1 for k in key_sets if _looped(backend, n, k))
    act = n * c * (1 + (layer + looped) * b.layers)
    scores = n * b.heads * (keys + looped) * b.layers
    if b.grad == "partial":  # the first adapter use is layer 0's attn2: before it, nothing
        act -= n * c * (1 + _LAYER_NORMS - 2 + _QKV + looped)
        scores -= n * b.heads * (keys + looped)
    return act, scores


# Scores-sized fp32 buffers (batch x heads x queries x keys) besides the kept exp that one
# self-attention's backward holds: the cotangents of the probabilities and of the logits (2).
# XLA:CPU (docs/scaling.md) runs the backward of a looped attention one head at a time: 2 of a
# head's score matrix.
SCORES_BUFFERS = 2
BACKENDS = ("device", "cpu")


def _scores_bytes(b: Block, images: int, backend: str) -> int:
    """One scores-sized fp32 buffer of ``b``'s self-attention over ``images`` images (one
    head's where it is looped)."""
    if b.kind != "transformer":
        return 0
    heads = 1 if _looped(backend, b.tokens, b.tokens) else b.heads
    return images * heads * b.tokens**2 * F32


def _workspace_bytes(b: Block, images: int, act_bytes: int, backend: str) -> int:
    """The largest transient of ``b``'s backward: for attention, its scores-sized buffers
    (:data:`SCORES_BUFFERS`) and two activation cotangents; otherwise the block's input and
    output cotangents and one intermediate."""
    n = b.tokens * images
    if b.kind == "transformer" and b.grad != "none":
        scores = SCORES_BUFFERS * _scores_bytes(b, images, backend)
        return scores + 2 * n * b.cin * act_bytes
    return n * (b.cin + 2 * b.cout) * act_bytes


def _bytes(elements: tuple[int, int], act_bytes: int) -> int:
    return elements[0] * act_bytes + elements[1] * F32


def activation_bytes(spec: StepSpec) -> dict[str, int]:
    """Activation memory of one device: ``kept`` (what the backward keeps) + ``workspace`` (the
    largest working set of one block's backward, met while everything kept is still live: a
    UNet's last blocks run at the highest resolution, so its backward starts at its largest).

    With ``remat="full"`` every ResnetBlock2D and Transformer2DModel keeps only its input; its
    backward recomputes its forward, so the working set is that block's own kept tensors plus
    its backward transient. The reference forward keeps nothing (``stop_gradient``) and a
    memory-aware scheduler places it where its transient is smallest: not counted."""
    if spec.remat not in REMAT_MODELLED:
        raise ValueError(f"remat_policy {spec.remat!r} is not modelled; one of {REMAT_MODELLED}")
    if spec.mesh[2] != 1:
        raise ValueError("activations with tensor parallelism (mesh tensor > 1) are not modelled")
    if spec.backend not in BACKENDS:
        raise ValueError(f"backend {spec.backend!r}; one of {BACKENDS}")
    images = 2 * spec.batch_per_device  # the policy runs on [chosen; rejected]
    a, t, u = spec.act_bytes, spec.text_len, spec.num_user_tokens
    kept, work, earlier_transformer = 0, 0, 0
    for b in blocks(spec.unet, spec.latent_side):
        own = images * _bytes(_residual_elements(b, t, u, spec.backend), a)
        step_work = _workspace_bytes(b, images, a, spec.backend)
        if spec.remat == "full" and b.kind != "norm_out":
            kept += images * b.tokens * b.cin * a if b.grad != "none" else 0
            # XLA:CPU recomputes the next transformer block (in backward order) before this
            # block's backward is done (SD1.5 and SDXL buffer assignments; docs/scaling.md).
            step_work += own + (earlier_transformer if spec.backend == "cpu" else 0)
        else:
            kept += own
        if b.kind == "transformer":
            earlier_transformer = own
        if b.grad != "none":
            work = max(work, step_work)
    return {"kept": kept, "workspace": work, "total": kept + work}


# -- the breakdown ------------------------------------------------------------------------------


def batch_bytes(spec: StepSpec) -> int:
    """One device's rows of the step's inputs (fp32 caches): VAE moments of both images, text
    states, profile embedding; SDXL also its pooled text and 6 size ids."""
    cfg = spec.unet
    per_pair = 2 * spec.latent_side**2 * 2 * cfg.in_channels  # mean + logvar, both images
    per_pair += spec.text_len * cfg.cross_attention_dim + spec.user_embed_dim
    if spec.pooled_dim:
        per_pair += spec.pooled_dim + 6
    return spec.batch_per_device * spec.accum_steps * per_pair * F32


def breakdown(spec: StepSpec) -> dict[str, int]:
    """Per-device bytes of each part and their ``total`` (the step's peak)."""
    base, adapter = base_leaves(spec.unet), adapter_leaves(spec.unet, spec.user_embed_dim,
                                                          spec.num_user_tokens)  # fmt: skip
    adapter_b = sharded_bytes(adapter, F32, spec.mesh, spec.rules)
    frac = adapter_b / max(1, count(adapter) * F32)  # the state is sharded like the params
    opt = int(optimizer_state_elements(adapter, spec.optimizer) * F32 * frac)
    # Gradients: one adapter-sized fp32 tree; the accumulation scan carries a second one.
    grads = adapter_b * (2 if spec.accum_steps > 1 else 1)
    out = {
        "frozen_params": sharded_bytes(base, spec.param_bytes, spec.mesh, spec.rules),
        "adapter_params": adapter_b,
        "optimizer_state": opt,
        "gradients": grads,
        "batch": batch_bytes(spec),
        "activations": activation_bytes(spec)["total"],
    }
    out["total"] = sum(out.values())
    return out


# -- throughput ---------------------------------------------------------------------------------


def allreduce_bytes(spec: StepSpec) -> int:
    """Adapter gradient bytes each data-parallel replica sends and receives per step in a ring
    all-reduce: ``2 (n - 1) / n`` x the fp32 gradient (0 on one device)."""
    n = spec.data_parallel
    grads = count(adapter_leaves(spec.unet, spec.user_embed_dim, spec.num_user_tokens)) * F32
    return int(2 * (n - 1) / n * grads) if n > 1 else 0


def fsdp_gather_bytes(spec: StepSpec, passes: int = 3) -> int:
    """Frozen-weight bytes a device receives per step under fsdp: the parts of the split weights
    it does not hold (whole size minus its shard), gathered for the policy forward, the
    reference forward and the backward (``passes``)."""
    if spec.mesh[1] == 1:
        return 0
    base = base_leaves(spec.unet)
    replicated = sharded_bytes(base, spec.param_bytes, (spec.data_parallel, 1, spec.mesh[2]),
                               spec.rules)  # fmt: skip
    return passes * (replicated - sharded_bytes(base, spec.param_bytes, spec.mesh, spec.rules))


def step_time(spec: StepSpec, flops_per_pair: float, peak_flops: float, mfu: float,
              link_bytes_per_s: float) -> dict[str, float]:  # fmt: skip
    """Seconds per micro-batch step on one device: compute at ``mfu`` of ``peak_flops``, plus the
    gradient all-reduce and fsdp's weight gathers at ``link_bytes_per_s`` (counted as not
    overlapped: an upper bound). ``pairs_per_s`` is per device."""
    compute = spec.batch_per_device * flops_per_pair / (peak_flops * mfu)
    comm = (allreduce_bytes(spec) + fsdp_gather_bytes(spec)) / link_bytes_per_s
    total = compute + comm
    return {"compute_s": compute, "comm_s": comm, "step_s": total,
            "pairs_per_s": spec.batch_per_device / total}  # fmt: skip


# -- from a config ------------------------------------------------------------------------------


def spec_from_config(config: Any, *, batch_per_device: int | None = None,
                     mesh: Sequence[int] | None = None, resolution: int | None = None,
                     remat: str | None = None, dtype: str | None = None,
                     text_len: int = 77, vae_scale: int = 8,
                     backend: str = "device") -> StepSpec:  # fmt: skip
    """The :class:`StepSpec` of a training config (``configs/*.py``), with overrides.

    ``mesh``: (data, fsdp, tensor), default the config's (its -1 must be resolved by passing
    ``mesh``); ``batch_per_device``: default ``train.batch_size`` over data x fsdp;
    ``resolution``: default ``data.resolution``, else the UNet's ``sample_size`` latents.
    ``text_len``: CLIP's 77 (the configs do not name the text encoder's length)."""
    model = config.model
    unet = UNetConfig.from_diffusers_config(dict(model.unet))
    if mesh is None:
        shape = dict(config.mesh.shape)
        mesh = tuple(int(shape.get(a, 1)) for a in parallel.MESH_AXES)
    mesh = tuple(int(m) for m in mesh)
    if any(m < 1 for m in mesh):
        raise ValueError(f"mesh {mesh}: pass explicit sizes, e.g. mesh=(8, 1, 1)")
    dp = mesh[0] * mesh[1]
    if batch_per_device is None:
        if int(config.train.batch_size) % dp:
            raise ValueError(f"train.batch_size {config.train.batch_size} does not split "
                             f"over data x fsdp = {dp}")  # fmt: skip
        batch_per_device = int(config.train.batch_size) // dp
    resolution = resolution or config.data.get("resolution")
    side = int(resolution) // vae_scale if resolution else unet.sample_size  # latents' own size
    dtype = np.dtype(jax.numpy.dtype(dtype or model.dtype))
    pooled = 0
    if unet.addition_embed_type == "text_time":
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    return StepSpec(
        unet=unet,
        user_embed_dim=int(model.adapter.user_embed_dim),
        num_user_tokens=int(model.adapter.num_user_tokens),
        latent_side=side,
        text_len=text_len,
        pooled_dim=pooled,
        batch_per_device=int(batch_per_device),
        accum_steps=int(config.train.accum_steps),
        param_bytes=dtype.itemsize,
        act_bytes=dtype.itemsize,
        remat=str(remat or model.get("remat_policy", "none")),
        optimizer=str(config.optim.name),
        mesh=mesh,  # type: ignore[arg-type]
        rules=parallel.logical_rules(config.mesh),
        backend=backend,
    )
