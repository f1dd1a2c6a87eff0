"""Sample 8 latents of the tiny model on one device and split over an 8-device mesh (4x2x1,
and every local device on the data axis); print the largest relative differences as JSON.
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax.core import meta

from configs import tiny
from psa_jax.core import parallel as sharding
from psa_jax.models.psa_unet import init_variables, unet_module_from_config
from psa_jax.sample import schedulers
from psa_jax.sample.sampler import Conditioning, Sampler, sample_latents


def main() -> None:
    cfg = tiny.get_config()
    module = unet_module_from_config(cfg.model)
    variables = meta.unbox(init_variables(module, 0))
    rng = np.random.default_rng(0)
    variables["adapter"] = jax.tree.map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)).astype(np.float32),
        variables["adapter"],
    )
    n, dim = 8, cfg.model.unet["cross_attention_dim"]
    cond = Conditioning(
        text_states=rng.standard_normal((n, 8, dim)).astype(np.float32),
        neg_text_states=rng.standard_normal((n, 8, dim)).astype(np.float32),
        user_embeds=rng.standard_normal((n, 384)).astype(np.float32),
        user_scale=np.ones(n, np.float32),
    )
    schedule = schedulers.make_sampler_schedule("ddim", 4)
    sampler = Sampler(module, 3.0)
    seeds = np.arange(n)
    single = np.asarray(sample_latents(sampler, schedule, variables, cond, seeds, (16, 16, 4)))
    cfg.mesh.shape = {"data": 4, "fsdp": 2, "tensor": 1}
    mesh = sharding.make_mesh(cfg.mesh)
    shardings = (sharding.batch_sharding(mesh), sharding.replicated(mesh))
    shape = (16, 16, 4)
    out = sample_latents(sampler, schedule, variables, cond, seeds, shape, shardings=shardings)
    spread = len({d.id for d in out.sharding.device_set})
    err = float(np.max(np.abs(np.asarray(out) - single)) / np.max(np.abs(single)))
    # Every local device on the data axis (Pipeline.mesh, as the demo sets it).
    local = sharding.local_data_mesh()
    shardings = (sharding.batch_sharding(local), sharding.replicated(local))
    out = sample_latents(sampler, schedule, variables, cond, seeds, shape, shardings=shardings)
    local_err = float(np.max(np.abs(np.asarray(out) - single)) / np.max(np.abs(single)))
    result = {"devices": spread, "rel_err": err, "local_shape": dict(local.shape),
              "local_devices": len({d.id for d in out.sharding.device_set}),
              "local_rel_err": local_err}  # fmt: skip
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
