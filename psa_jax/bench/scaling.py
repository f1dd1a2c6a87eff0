"""The memory/throughput model's tables (``docs/scaling.md``) and its check against XLA.

    python -m psa_jax.bench.scaling tables                 # the markdown tables of docs/scaling.md
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
        python -m psa_jax.bench.scaling measure --shape sd15 --batch 1 --remat none

``measure`` lowers and compiles the real DPO step (``trainer.compile_step``'s jit, the bench's
shapes) from abstract inputs -- no weights are made -- and prints ``compiled.memory_analysis()``
next to :mod:`psa_jax.train.memory_model`'s breakdown, as one JSON object. XLA:CPU's default
scheduler orders for concurrency, not memory (its temporaries are ~2x a memory-aware schedule's
here); the flag above selects a memory-minimising one, which is what GPU/TPU schedulers aim at.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from psa_jax.bench import flops as flops_lib
from psa_jax.bench.jax_train import synthetic_batch
from psa_jax.bench.shapes import SHAPES, BenchShape, config_dir, resolve
from psa_jax.config import load_config
from psa_jax.core import diffusion as noise_lib
from psa_jax.core import parallel
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config
from psa_jax.train import memory_model as mm
from psa_jax.train.optim import make_optimizer
from psa_jax.train.step import DPOTask
from psa_jax.train.tasks import Setup
from psa_jax.train.trainer import RunState, compile_step, state_shardings

GIB = 2**30
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


# -- measuring the compiled step ----------------------------------------------------------------


def _with_mesh(shape: BenchShape, mesh: Sequence[int] | None) -> BenchShape:
    if mesh is not None:
        shape.config.mesh.shape = dict(zip(parallel.MESH_AXES, (int(m) for m in mesh)))
    return shape


def lower_step(shape: BenchShape) -> tuple[jax.stages.Lowered, Any]:
    """The DPO step ``psa-jax train`` compiles for ``shape`` (its state, frozen tree and batch
    shardings, donation), lowered from ``ShapeDtypeStruct`` inputs; also the mesh."""
    config = shape.config
    module = unet_module_from_config(config.model, config.model.dtype, shape.unet)
    boxes = abstract_variables(module)
    schedule = noise_lib.noise_schedule_from_config(dict(config.noise))
    task = DPOTask(module, schedule, float(config.train.beta), shape.scaling_factor)
    setup = Setup(task, None, boxes["adapter"], None, boxes["params"])
    optimizer = make_optimizer(config.optim)
    mesh = parallel.make_mesh(config.mesh)
    boxed_state, shardings = state_shardings(config, setup, optimizer, mesh)
    step = compile_step(config, RunState(setup, optimizer, None, None, 0, mesh, shardings))
    dtype = jnp.dtype(config.model.dtype)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                          meta.unbox(boxes["params"]))  # fmt: skip
    global_rows = int(config.train.batch_size)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in synthetic_batch(shape, global_rows).items()}  # fmt: skip
    return step.lower(meta.unbox(boxed_state), frozen, batch), mesh


def model_spec(shape: BenchShape, mesh: Any, backend: str) -> mm.StepSpec:
    """The memory model's spec of the step :func:`lower_step` builds for ``shape``."""
    sizes = tuple(int(mesh.shape[a]) for a in parallel.MESH_AXES)
    dp = sizes[0] * sizes[1]
    return mm.spec_from_config(shape.config, mesh=sizes, resolution=shape.resolution,
                               batch_per_device=int(shape.config.train.batch_size) // dp,
                               text_len=shape.text_len, backend=backend)  # fmt: skip


def measure(name: str, batch: int, remat: str, dtype: str = "float32",
            mesh: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Compile the step of bench shape ``name`` with ``batch`` pairs (global) and report XLA's
    per-device ``memory_analysis`` and the model's breakdown (its ``cpu`` backend on a CPU)."""
    shape = _with_mesh(resolve(name, batch=batch, dtype=dtype, remat=remat), mesh)
    t0 = time.perf_counter()
    lowered, device_mesh = lower_step(shape)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")  # fmt: skip
    xla = {f: int(getattr(m, f)) for f in fields}
    xla["peak"] = (xla["argument_size_in_bytes"] + xla["output_size_in_bytes"]
                   - xla["alias_size_in_bytes"] + xla["temp_size_in_bytes"])  # fmt: skip
    device = device_mesh.devices.flat[0]
    backend = "cpu" if device.platform == "cpu" else "device"
    spec = model_spec(shape, device_mesh, backend)
    return {
        "shape": name,
        "resolution": shape.resolution,
        "global_batch": batch,
        "remat": remat,
        "dtype": dtype,
        "mesh": dict(device_mesh.shape),
        "xla": xla,
        "model": mm.breakdown(spec),
        "model_activations": mm.activation_bytes(spec),
        "model_backend": backend,
        "compile_s": round(compile_s, 1),
        "device": device.device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# -- throughput and hardware --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One slice: its JAX device count, HBM per device and vendor peaks (assumptions, see the
    doc: bf16 dense peak, per-device interconnect bandwidth usable by an all-reduce)."""

    name: str
    devices: int
    hbm_bytes: int
    peak_flops: float
    link_bytes_per_s: float


HARDWARE = (
    Hardware("TPU v4-32", 16, 32 * GIB, 275e12, 1.1e15 / 4096),  # pod all-reduce BW / chips
    Hardware("TPU v5p-128", 64, 95 * GIB, 459e12, 600e9),  # ICI 4800 Gbps per chip
    Hardware("8x H100 80GB", 8, 80 * 10**9, 989e12, 450e9),  # NVLink 4, one direction
)
MFU = 0.4  # assumed model-FLOPs utilisation: no GPU/TPU row exists in BENCHMARKS.md yet
FIT = 0.85  # use at most this share of HBM: XLA's own reserve and the model's +-15% check
BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)


def recipe_config(name: str) -> Any:
    """The training config of bench shape ``name`` as ``psa-jax train`` reads it (bf16, its
    optimizer, batch and accumulation), unlike the bench's resolved copy."""
    return load_config(os.path.join(config_dir(), SHAPES[name].config_file))


def flops_per_pair(shape: BenchShape, remat: str) -> tuple[float, float]:
    """``(model, executed)`` FLOPs of one pair: ``bench/flops.py``'s DPO count (the MFU
    numerator), and with ``remat="full"`` the policy forward of both images run again."""
    model = flops_lib.dpo_step(shape, 1)["model"]
    if remat != "full":
        return model, model
    fwd = flops_lib.unet_forward(shape.unet, shape.latent_side, shape.text_len,
                                 shape.num_user_tokens).flops  # fmt: skip
    return model, model + 2 * fwd


def step_estimate(shape: BenchShape, spec: mm.StepSpec, hw: Hardware) -> dict[str, float]:
    """Seconds per micro-batch step and pairs/s per device for ``spec`` on ``hw``."""
    _, executed = flops_per_pair(shape, spec.remat)
    return mm.step_time(spec, executed, hw.peak_flops, MFU, hw.link_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Choice:
    hardware: Hardware
    spec: mm.StepSpec
    total: int
    accum: int
    pairs_per_s: float  # the whole slice


def recommend(name: str, hw: Hardware) -> Choice | None:
    """The mesh, per-device batch and remat that fit in ``FIT`` x HBM with the most modelled
    pairs/s, keeping the config's pairs per update (``batch_size x accum_steps``) exactly; ties
    go to the larger batch, then to less fsdp."""
    shape, config = resolve(name), recipe_config(name)
    update = int(config.train.batch_size) * int(config.train.accum_steps)
    best: tuple | None = None
    for fsdp in [f for f in (1, 2, 4, 8, 16) if hw.devices % f == 0]:
        mesh = (hw.devices // fsdp, fsdp, 1)
        for batch in BATCHES:
            if update % (batch * hw.devices):
                continue  # the recipe's pairs per update exactly, or not at all
            accum = update // (batch * hw.devices)
            for remat in mm.REMAT_MODELLED:
                config.train.accum_steps = accum
                spec = mm.spec_from_config(config, mesh=mesh, batch_per_device=batch,
                                           remat=remat)  # fmt: skip
                total = mm.breakdown(spec)["total"]
                if total > FIT * hw.hbm_bytes:
                    continue
                rate = step_estimate(shape, spec, hw)["pairs_per_s"] * hw.devices
                key = (round(rate, 3), batch, -fsdp)
                if best is None or key > best[0]:
                    best = (key, Choice(hw, spec, total, accum, rate))
    return None if best is None else best[1]


# -- markdown -----------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def memory_table(name: str, meshes: Sequence[tuple[int, int, int]], batches: Sequence[int]) -> str:
    """Per-device GiB of each part, for ``meshes`` x ``batches`` x remat (bf16 base, the
    config's optimizer and accumulation)."""
    config = recipe_config(name)
    rows = ["| mesh (data, fsdp) | pairs/device | remat | frozen | adapter+grads+opt | "
            "activations | **total** |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mesh in meshes:
        for batch in batches:
            for remat in mm.REMAT_MODELLED:
                spec = mm.spec_from_config(config, mesh=mesh, batch_per_device=batch,
                                           remat=remat)  # fmt: skip
                b = mm.breakdown(spec)
                train = b["adapter_params"] + b["gradients"] + b["optimizer_state"]
                rows.append(f"| {mesh[0]} x {mesh[1]} | {batch} | {remat} | "
                            f"{_gib(b['frozen_params'])} | {_gib(train)} | "
                            f"{_gib(b['activations'])} | **{_gib(b['total'])}** |")  # fmt: skip
    return "\n".join(rows)


def param_table() -> str:
    rows = ["| model | base params | fsdp-shardable (dense) | adapter params | "
            "adapter fp32 | optimizer |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("sd15", "sdxl"):
        spec = mm.spec_from_config(recipe_config(name), mesh=(1, 1, 1), batch_per_device=1)
        base = mm.base_leaves(spec.unet)
        dense = sum(leaf.size for leaf in base if "embed" in leaf.names)
        adapter = mm.count(mm.adapter_leaves(spec.unet, spec.user_embed_dim,
                                             spec.num_user_tokens))  # fmt: skip
        rows.append(f"| {name} | {mm.count(base):,} | {dense / mm.count(base):.0%} | "
                    f"{adapter:,} | {adapter * 4 / GIB:.2f} GiB | {spec.optimizer} |")  # fmt: skip
    return "\n".join(rows)


def throughput_table() -> str:
    rows = ["| model | GFLOP/pair (model) | + remat recompute | hardware | pairs/s/device "
            "(no remat) | all-reduce per step |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("sd15", "sdxl"):
        shape = resolve(name)
        model, executed = flops_per_pair(shape, "full")
        for hw in HARDWARE:
            spec = mm.spec_from_config(recipe_config(name), mesh=(hw.devices, 1, 1),
                                       batch_per_device=1, remat="none")  # fmt: skip
            est = step_estimate(shape, spec, hw)
            ar = mm.allreduce_bytes(spec)
            rows.append(f"| {name} {shape.resolution} px | {model / 1e9:,.0f} | "
                        f"{(executed - model) / 1e9:,.0f} | {hw.name} | "
                        f"{est['pairs_per_s']:.2f} | {ar / 1e6:,.0f} MB, "
                        f"{ar / hw.link_bytes_per_s * 1e3:.1f} ms |")  # fmt: skip
    return "\n".join(rows)


def recommendation_table() -> str:
    rows = ["| hardware | model | mesh (data x fsdp) | pairs/device x accum | remat | "
            "GiB/device (of HBM) | pairs/s (slice, modelled) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for hw in HARDWARE:
        for name in ("sd15", "sdxl"):
            c = recommend(name, hw)
            if c is None:
                rows.append(f"| {hw.name} | {name} | does not fit | | | | |")
                continue
            s = c.spec
            rows.append(f"| {hw.name} | {name} | {s.mesh[0]} x {s.mesh[1]} | "
                        f"{s.batch_per_device} x {c.accum} | {s.remat} | {_gib(c.total)} "
                        f"({_gib(hw.hbm_bytes)}) | {c.pairs_per_s:.1f} |")  # fmt: skip
    return "\n".join(rows)


def tables() -> str:
    """Every table of docs/scaling.md that the model generates."""
    sd15 = memory_table("sd15", [(8, 1, 1), (2, 8, 1)], [1, 2, 6])
    sdxl = memory_table("sdxl", [(8, 1, 1), (2, 8, 1)], [1, 2, 4])
    parts = [
        ("Parameters", param_table()),
        ("SD1.5, 512 px, per device", sd15),
        ("SDXL, 1024 px, per device", sdxl),
        ("Throughput", throughput_table()),
        ("Recommended meshes", recommendation_table()),
    ]
    return "\n\n".join(f"#### {title}\n\n{body}" for title, body in parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psa_jax.bench.scaling")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tables", help="print docs/scaling.md's generated tables")
    m = sub.add_parser("measure", help="compile the step, print memory_analysis vs the model")
    m.add_argument("--shape", default="sd15")
    m.add_argument("--batch", type=int, default=1, help="global pairs per step")
    m.add_argument("--remat", default="none", choices=mm.REMAT_MODELLED)
    m.add_argument("--dtype", default="float32")
    m.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: all devices data)")
    args = parser.parse_args(argv)
    if args.command == "tables":
        sys.stdout.write(tables())
        return 0
    mesh = [int(x) for x in args.mesh.split(",")] if args.mesh else None
    print(json.dumps(measure(args.shape, args.batch, args.remat, args.dtype, mesh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
