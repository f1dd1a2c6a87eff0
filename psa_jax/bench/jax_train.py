"""``psa_jax``: the real Diffusion-DPO train step, built and compiled as ``psa-jax train`` does.

``build_task`` makes the task and its trainable/frozen trees from the config, the state and
shardings are made as ``trainer.create_state`` makes a fresh run's, and the step is
``trainer.compile_step``'s jit (state donated, the config's mesh and logical-axis shardings).
Only the inputs differ: a random frozen base instead of a pretrained one and a synthetic batch
of cached-encoder outputs (VAE moments, text states, profile embeddings) of the right shapes.
The step is compiled ahead of time so compilation is timed apart from running.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec

from psa_jax.bench.measure import Contestant, jax_peak_memory, xla_flops
from psa_jax.bench.shapes import BenchShape, random_params
from psa_jax.core import diffusion as noise_lib
from psa_jax.core import parallel
from psa_jax.data.loader import make_global_batch
from psa_jax.models.loading import BaseModels
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config
from psa_jax.train.optim import make_optimizer
from psa_jax.train.step import init_state
from psa_jax.train.tasks import build_task
from psa_jax.train.trainer import RunState, compile_step, state_shardings


def base_models(shape: BenchShape, seed: int = 0) -> BaseModels:
    """The config's UNet module with random frozen weights (host numpy, in ``model.dtype``);
    no text encoder or VAE: training reads their cached outputs."""
    model = shape.config.model
    module = unet_module_from_config(model, model.dtype, shape.unet)
    params = random_params(meta.unbox(abstract_variables(module)["params"]), seed)
    params = jax.tree.map(lambda x: np.asarray(x).astype(model.dtype), params)
    schedule = noise_lib.noise_schedule_from_config(dict(shape.config.noise))
    return BaseModels(module, params, None, None, None, schedule, shape.scaling_factor)


def synthetic_batch(shape: BenchShape, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A loader batch's step inputs (NHWC VAE moments of both images, text states, profile
    embeddings; SDXL: pooled text and size ids), random, float32 as the caches store them."""
    rng = np.random.default_rng(seed)
    s, c = shape.latent_side, shape.latent_channels

    def moments() -> np.ndarray:
        mean = rng.standard_normal((batch, s, s, c), np.float32)
        return np.concatenate([mean, np.full_like(mean, -2.0)], axis=-1)

    out = {
        "chosen_moments": moments(),
        "rejected_moments": moments(),
        "text_states": rng.standard_normal((batch, shape.text_len, shape.text_dim), np.float32),
        "user_embeds": rng.standard_normal((batch, shape.user_embed_dim), np.float32),
    }
    if shape.sdxl:
        out["text_pooled"] = rng.standard_normal((batch, shape.pooled_dim), np.float32)
        r = float(shape.resolution)
        out["time_ids"] = np.tile(np.array([r, r, 0, 0, r, r], np.float32), (batch, 1))
    return out


def build_run(shape: BenchShape, models: BaseModels, devices: list | None = None) -> RunState:
    """``trainer.create_state`` for a fresh run: task, optimizer, shardings, state, frozen."""
    config = shape.config
    rng = np.random.default_rng(int(config.seed) + 1)
    users = rng.standard_normal((16, shape.user_embed_dim)).astype(np.float32)
    setup = build_task(config, models, users)  # users: a "standardized" projection's statistics
    optimizer = make_optimizer(config.optim)
    mesh = parallel.make_mesh(config.mesh, devices)
    seed = int(config.seed)
    _, shardings = state_shardings(config, setup, optimizer, mesh)
    init = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings["state"])
    state = init(parallel.put_tree(setup.trainable, shardings["state"].params))
    frozen = parallel.put_tree(setup.frozen, shardings["frozen"])
    return RunState(setup, optimizer, state, frozen, 0, mesh, shardings)


def psa_jax_contestant(
    shape: BenchShape, models: BaseModels, batch: int, devices: list | None = None
) -> Contestant:
    """The compiled step, ready to time; compilation (lower + compile) is timed here."""
    run = build_run(shape, models, devices)
    step_fn = compile_step(shape.config, run)
    local = synthetic_batch(shape, batch, seed=int(shape.config.seed))
    gb = make_global_batch(local, run.mesh, PartitionSpec(parallel.BATCH_AXES))
    t0 = time.perf_counter()
    compiled = step_fn.lower(run.state, run.frozen, gb).compile()
    compile_s = time.perf_counter() - t0
    holder: dict[str, Any] = {"state": run.state, "frozen": run.frozen}

    def step() -> Any:
        holder["state"], holder["metrics"] = compiled(holder["state"], holder["frozen"], gb)
        return holder["state"], holder["metrics"]

    def close() -> None:
        holder.clear()
        gb.clear()

    device = run.mesh.devices.flat[0]
    notes = (f"jit(train_step) AOT; mesh {dict(run.mesh.shape)}; remat {config_remat(shape)}; "
             f"attention {shape.config.model.attention}")  # fmt: skip
    return Contestant(
        "psa_jax",
        step,
        step,
        jax.block_until_ready,
        compile_s,
        peak_memory=lambda: jax_peak_memory(compiled, device),
        flops_xla=xla_flops(compiled, run.mesh.size),
        info={"notes": notes, "device": device.device_kind},
        close=close,
        loss=lambda: float(holder["metrics"]["loss"]),
    )


def config_remat(shape: BenchShape) -> str:
    return str(shape.config.model.get("remat_policy", "none"))
