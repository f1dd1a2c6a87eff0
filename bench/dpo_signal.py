"""How much signal one Diffusion-DPO batch carries, at a config's starting point.

    python bench/dpo_signal.py --config configs/tiny.py --batches 240 \
        --config.model.vae_path=runs/tiny/vae --config.model.base_workdir=runs/tiny/base

Prints the norm of the mean adapter gradient over ``--batches`` training batches against the
mean norm of one batch's gradient (their ratio: the gradient signal-to-noise of one step), and
the held-out ``pair_acc`` (margin averaged over 8 draws) after moving the adapter along the mean
gradient by a few step sizes: whether a first-order direction that generalises exists at all.
A diagnostic for choosing batch size, steps and the toy world's design, not a unit test.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from psa_jax.cli.train import config_overrides
from psa_jax.config import apply_overrides, load_config
from psa_jax.data import prepare
from psa_jax.models import loading
from psa_jax.train import tasks
from psa_jax.train.step import step_inputs


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _unflat(vec: np.ndarray, like):
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for x in leaves:
        out.append(vec[i : i + x.size].reshape(x.shape).astype(np.float32))
        i += x.size
    return jax.tree.unflatten(treedef, out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--batches", type=int, default=240)
    p.add_argument("--scales", default="0.3,1,3,10", help="step sizes along -mean gradient")
    args, extra = p.parse_known_args(argv)
    config = apply_overrides(load_config(args.config), config_overrides(extra))
    models = loading.load_base_models(config)
    splits = prepare.prepare_data(config, models)
    bs = int(config.train.batch_size)

    def loader(split: str, batch: int, **kw):
        caches = prepare.open_caches(config, models, splits, split)
        return prepare.make_loader(config, splits, split, caches, batch, seed=0, **kw)

    train_it = loader(config.data.train_split, bs)
    eval_it = loader(config.data.eval_split, 32, num_epochs=1)
    embeds = tasks.training_user_embeds(config, splits, train_it)
    setup = tasks.build_task(config, models, embeds)
    task, frozen, adapter = setup.task, setup.frozen, setup.trainable
    grad = jax.jit(jax.grad(lambda a, b, r: task.loss(a, frozen, b, r)[0]))
    margins = jax.jit(lambda a, b, r: task.margins(a, frozen, b, r))

    grads = np.stack(
        [_flat(grad(adapter, step_inputs(next(train_it)), jax.random.PRNGKey(i)))
         for i in range(args.batches)]
    )  # fmt: skip
    mean = grads.mean(0)
    per_batch = float(np.linalg.norm(grads, axis=1).mean())
    out = {
        "pairs_per_batch": bs,
        "batches": args.batches,
        "mean_grad_norm": float(np.linalg.norm(mean)),
        "batch_grad_norm": per_batch,
        # The mean of n noisy gradients keeps ~batch_norm / sqrt(n) of noise: subtract it.
        "noise_floor_of_mean": per_batch / np.sqrt(args.batches),
        "snr_per_batch": float(np.linalg.norm(mean)) / per_batch,
        "first_order_pair_acc": {},
    }
    held_out = [step_inputs(next(eval_it)) for _ in range(2)]
    direction = -mean / max(np.linalg.norm(mean), 1e-30)
    for scale in (float(s) for s in args.scales.split(",")):
        moved = _unflat(_flat(adapter) + scale * direction, adapter)
        m = np.concatenate([
            np.mean([np.asarray(margins(moved, b, jax.random.PRNGKey(100 + k)))
                     for k in range(8)], 0)
            for b in held_out
        ])  # fmt: skip
        out["first_order_pair_acc"][str(scale)] = float(np.mean(m > 0))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
