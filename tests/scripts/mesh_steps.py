"""Run 5 DPO steps of the tiny model on several meshes; print losses, params and each compiled
step's per-device temporary bytes as JSON.

The step is ``trainer.compile_step``'s (traced under the mesh and the logical-axis rules: the
modules' activation constraints apply); a shape with ``"constrain": false`` is jitted from
``make_train_step`` alone, as before those constraints existed, with the same shardings.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train_mesh.py does).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from flax.core import meta

from configs import tiny
from psa_jax.core import diffusion as noise
from psa_jax.core import parallel as sharding
from psa_jax.models.psa_unet import _adapter_init, abstract_variables, unet_module_from_config
from psa_jax.train.step import DPOTask, init_state, make_train_step
from psa_jax.train.tasks import Setup
from psa_jax.train.trainer import RunState, compile_step

STEPS, BATCH = 5, 8


def batches():
    r = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {
            "chosen_moments": r.normal(size=(BATCH, 16, 16, 8)).astype(np.float32),
            "rejected_moments": r.normal(size=(BATCH, 16, 16, 8)).astype(np.float32),
            "text_states": r.normal(size=(BATCH, 8, 32)).astype(np.float32),
            "user_embeds": r.normal(size=(BATCH, 384)).astype(np.float32),
        }


def run(shape: dict, devices, dtype) -> dict:
    shape = dict(shape)
    constrain = shape.pop("constrain", True)
    cfg = tiny.get_config()
    cfg.mesh.shape = shape
    cfg.train.accum_steps = 1
    module = unet_module_from_config(cfg.model, dtype=dtype)
    boxes = abstract_variables(module)
    params = meta.unbox(jax.jit(module.init)(jax.random.key(0), **_dummy(module))["params"])
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
    adapter_boxed = _adapter_init(module)(params, jax.random.key(1))
    # A trained-sized adapter: with a near-zero one the DPO logit is beta x (policy - reference)
    # of two almost equal forward passes, and 1e-7 reduction-order noise dominates it.
    rand = np.random.default_rng(1)
    adapter = jax.tree.map(
        lambda x: (np.asarray(x) + 0.5 * rand.standard_normal(np.shape(x))).astype(dtype),
        meta.unbox(adapter_boxed),
    )
    task = DPOTask(module, noise.make_noise_schedule(), 5000.0, 1.0)
    opt = optax.adamw(1e-3)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.logical_rules(cfg.mesh)
    boxed_state = jax.eval_shape(lambda p: init_state(p, opt, 0), adapter_boxed)
    state_sh = sharding.tree_shardings(boxed_state, mesh, rules)
    frozen_sh = sharding.tree_shardings(boxes["params"], mesh, rules)
    state = jax.jit(lambda p: init_state(p, opt, 0), out_shardings=state_sh)(
        sharding.put_tree(adapter, state_sh.params)
    )
    frozen = sharding.put_tree(params, frozen_sh)
    shardings = {"state": state_sh, "frozen": frozen_sh, "batch": sharding.batch_sharding(mesh),
                 "replicated": sharding.replicated(mesh)}  # fmt: skip
    if constrain:
        setup = Setup(task, None, None, None, None)
        step = compile_step(cfg, RunState(setup, opt, None, None, 0, mesh, shardings))
    else:
        step = jax.jit(
            make_train_step(task.loss, opt),
            in_shardings=(state_sh, frozen_sh, shardings["batch"]),
            out_shardings=(state_sh, shardings["replicated"]),
            donate_argnums=(0,),
        )
    losses, temp_bytes = [], None
    for b in batches():
        gb = jax.device_put(b, shardings["batch"])
        if temp_bytes is None:
            step = step.lower(state, frozen, gb).compile()
            temp_bytes = int(step.memory_analysis().temp_size_in_bytes)
        state, m = step(state, frozen, gb)
        losses.append(float(m["loss"]))
    sharded = sorted({str(s.spec) for s in jax.tree.leaves(state_sh.params)})
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
    return {"losses": losses, "params": np.concatenate(leaves).tolist(), "specs": sharded,
            "temp_bytes": temp_bytes}  # fmt: skip


def _dummy(module):
    from psa_jax.models.psa_unet import _dummy_inputs

    return _dummy_inputs(module.config, module.user_embed_dim)


def main() -> None:
    """argv: JSON {name: mesh shape} ("single" runs on one device), then float32|float64."""
    shapes, dtype = json.loads(sys.argv[1]), sys.argv[2]
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    out = {}
    for name, shape in shapes.items():
        devices = jax.devices()[:1] if name == "single" else jax.devices()
        out[name] = run(shape, devices, np.dtype(dtype))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
