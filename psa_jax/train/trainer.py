"""``train(config, workdir)``: one trainer for every task, from one CPU to a pod.

Resume order: the newest complete checkpoint in ``workdir`` (state, data position, nothing else
needed) -> a fresh start from the config (frozen base per :mod:`psa_jax.train.inputs`).

Per step: host batch (this process's rows) -> global ``jax.Array`` sharded over
``data x fsdp`` -> jitted ``train_step`` (state donated) -> metrics to JSONL/TensorBoard.
A non-finite loss or gradient norm raises :class:`NonFiniteError`; the step that produced it
changed nothing, and the checkpoints on disk are the last good ones.

``config.debug`` holds fault injection for tests (``kill_at_step``: SIGKILL this process when
that step begins, after in-flight checkpoint writes finish; ``nan_at_step``: poison that
step's batch). Both 0 (off) by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec
from tqdm.auto import tqdm

from psa_jax.data.loader import lookup_embeddings, make_global_batch
from psa_jax.models.adapter import PROJ_INITS, standardize_projection
from psa_jax.models.psa_unet import _adapter_init, abstract_variables
from psa_jax.models.vae import FlaxAutoencoderKL
from psa_jax.train import inputs, sharding
from psa_jax.train import lora as lora_lib
from psa_jax.train.checkpoint import Checkpointer
from psa_jax.train.metrics_io import MetricWriter
from psa_jax.train.optim import make_lr_schedule, make_optimizer
from psa_jax.train.step import (
    DenoiseTask,
    DPOTask,
    VAETask,
    init_state,
    latent_scaling_factor,
    make_train_step,
)

log = logging.getLogger(__name__)
TASKS = ("dpo", "denoise", "vae")
_BATCH_KEYS = (
    "chosen_moments",
    "rejected_moments",
    "chosen",
    "rejected",
    "text_states",
    "text_pooled",
    "user_embeds",
    "time_ids",
)


def step_inputs(batch: dict) -> dict:
    """The arrays of a loader batch that a train step reads (not ids, hashes or captions)."""
    return {k: batch[k] for k in _BATCH_KEYS if k in batch}


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; training stopped, checkpoints intact."""


class ResumeError(RuntimeError):
    """A checkpoint cannot continue this run (other process count, other task)."""


@dataclasses.dataclass
class Setup:
    """What ``train`` builds before its loop (tests use it to drive steps directly)."""

    task: Any
    trainable: Any  # host values of the trainable tree at step 0
    trainable_boxes: Any  # the same tree with logical-axis boxes (for shardings)
    frozen: Any  # host values of the frozen tree
    frozen_boxes: Any


def build_task(
    config: Any, models: inputs.BaseModels, user_embeds: Any = None, *, resuming: bool = False
) -> Setup:
    """The task named by ``config.task`` and its trainable / frozen trees (host arrays).

    ``user_embeds`` ``[N, D]``: the training users' profile embeddings, needed by a DPO run
    whose ``model.adapter.proj_init`` is ``"standardized"`` (see ``standardize_projection``).
    ``resuming``: a checkpoint replaces the initial trainable values, so that initialisation
    (and its embeddings) is skipped; shapes and boxes are unchanged.
    """
    train = config.train
    module, params = models.module, models.unet_params
    if config.task == "dpo":
        task = DPOTask(module, models.schedule, float(train.beta), models.scaling_factor,
                       float(train.dpo_chosen_weight))  # fmt: skip
        rng = jax.random.key(int(config.model.get("init_seed", 0)) + 3)
        boxed = _adapter_init(module)(params, rng)
        adapter = meta.unbox(boxed)
        if _proj_init(config) == "standardized" and not resuming:
            if user_embeds is None:
                raise ValueError("proj_init='standardized' needs the training users' embeddings")
            proj = standardize_projection(adapter["user_proj"], user_embeds)
            adapter = {**adapter, "user_proj": jax.tree.map(np.asarray, proj)}
        frozen_boxes = abstract_variables(module)["params"]
        return Setup(task, adapter, boxed, params, frozen_boxes)
    if config.task == "denoise":
        target = train.denoise_target
        lcfg = train.lora
        task = DenoiseTask(
            module,
            models.schedule,
            target,
            lora_lib.lora_scale(lcfg.rank, lcfg.alpha),
            train.image_key,
            models.scaling_factor,
            float(train.snr_gamma),
        )
        boxes = abstract_variables(module)["params"]
        if target == "unet":
            return Setup(task, params, boxes, {}, {})
        rng = jax.random.key(int(config.model.get("init_seed", 0)) + 4)
        lora = lora_lib.init_lora(params, lcfg.rank, tuple(lcfg.targets), rng=rng)
        return Setup(task, lora, lora, params, boxes)
    if config.task == "vae":
        if models.vae is None:
            raise ValueError("task 'vae' needs a VAE in the config (config.model.vae)")
        task = VAETask(models.vae.module, float(train.get("vae_kl_weight", 1e-6)))
        boxes = jax.eval_shape(lambda p: p, models.vae.params)  # replicated: a tiny model
        return Setup(task, models.vae.params, boxes, {}, {})
    raise ValueError(f"unknown task {config.task!r}; tasks: {TASKS}")


def _proj_init(config: Any) -> str:
    """``model.adapter.proj_init`` checked against PROJ_INITS ("torch" where the key is absent:
    configs written before it existed)."""
    proj_init = config.model.adapter.get("proj_init", "torch")
    if proj_init not in PROJ_INITS:
        raise ValueError(f"model.adapter.proj_init {proj_init!r} unknown; one of {PROJ_INITS}")
    return proj_init


def training_user_embeds(config: Any, splits: inputs.Splits, loader: Any) -> np.ndarray | None:
    """``[N, D]`` embeddings of the users in ``loader``'s split when the adapter's projection is
    initialised from them (``proj_init="standardized"``), else None. Only training users: a
    held-out user must not shape the initialisation."""
    if config.task != "dpo" or _proj_init(config) != "standardized":
        return None
    return lookup_embeddings(loader.user_ids(), splits.embeddings)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _config_json(config: Any) -> dict:
    return json.loads(config.to_json_best_effort())


def _data_state(loader: Any) -> dict:
    """The loader position to checkpoint: identical on every process but for its index."""
    state = loader.get_state()
    return {k: v for k, v in state.items() if k != "process_index"}


def _restore_data_state(loader: Any, saved: dict) -> None:
    if saved.get("process_count") != loader.process_count:
        raise ResumeError(
            f"checkpoint was written by {saved.get('process_count')} processes, this run has "
            f"{loader.process_count}: its data position cannot be restored exactly"
        )
    loader.set_state({**saved, "process_index": loader.process_index})


def _fault(config: Any, step: int, batch: dict, ckpt: Checkpointer) -> dict:
    """Test-only fault injection at the start of (1-based) ``step``."""
    debug = config.get("debug", {})
    if debug.get("kill_at_step", 0) == step:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    if debug.get("nan_at_step", 0) == step:
        batch = dict(batch)
        batch["user_embeds"] = np.array(batch["user_embeds"], copy=True)
        batch["user_embeds"][0, 0] = np.nan
    return batch


def _evaluate(eval_fns, state, frozen, batches, mesh, draws: int) -> dict[str, float]:
    """Held-out metrics over fixed batches with fixed rngs (comparable across steps and runs).

    ``eval/<metric>``: the training metrics, one (noise, timestep) draw per pair.
    ``eval/pair_acc``: share of pairs whose reward margin, averaged over ``draws`` draws, is
    positive (ties half) -- the sign of the expected implicit reward, far less noisy than one
    draw. A run evaluates at step 0 too, so that the curve starts at the untrained value.
    """
    metrics_fn, margins_fn = eval_fns
    totals: dict[str, float] = {}
    right = count = 0
    for i, batch in enumerate(batches):
        gb = make_global_batch(batch, mesh, PartitionSpec(sharding.BATCH_AXES))
        m = jax.device_get(metrics_fn(state.params, frozen, gb, jax.random.PRNGKey(10_000 + i)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        if margins_fn is not None:
            keys = [jax.random.PRNGKey(20_000 + draws * i + k) for k in range(draws)]
            mean = np.mean([np.asarray(margins_fn(state.params, frozen, gb, k)) for k in keys], 0)
            # A tie (an adapter still at its zero init: policy == reference) counts half.
            hits = float(np.sum(mean > 0)) + 0.5 * float(np.sum(mean == 0))
            right, count = right + hits, count + mean.size
    if count:
        totals["pair_acc"] = right / count
    return totals


def train(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train until ``config.train.steps``, resuming from ``workdir`` when it has a checkpoint.

    Returns a summary: final step, last train metrics, last eval metrics, checkpoint steps.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    tcfg = config.train
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; tasks: {TASKS}")
    models = inputs.load_base_models(config)
    splits = inputs.prepare_data(config, models)
    # The VAE task learns from pixels: its caches hold text only.
    with_vae = config.task != "vae"
    caches = inputs.open_caches(config, models, splits, config.data.train_split, with_vae)
    batch_size = int(tcfg.batch_size) * int(tcfg.accum_steps)
    loader = inputs.make_loader(
        config, splits, config.data.train_split, caches, batch_size, seed=int(config.seed)
    )

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    if batch_size % sharding.data_parallel_size(mesh):
        raise ValueError(f"global batch {batch_size} does not split over the mesh {mesh.shape}")
    # One exit stack from the checkpointer on: a set-up error (config, sharding) closes the
    # manager too, and the writer and progress bar close before it, as they were opened.
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            Checkpointer(
                workdir, max_to_keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint
            )
        )
        start = ckpt.latest_step()
        # On resume the checkpoint holds the adapter: no need to scan the split for its init.
        embeds = None if start is not None else training_user_embeds(config, splits, loader)
        setup = build_task(config, models, embeds, resuming=start is not None)
        optimizer = make_optimizer(config.optim)
        seed = int(config.seed)
        boxed_state = jax.eval_shape(
            lambda p: init_state(p, optimizer, seed), setup.trainable_boxes
        )
        state_sh = sharding.tree_shardings(boxed_state, mesh, rules)
        frozen_sh = sharding.tree_shardings(setup.frozen_boxes, mesh, rules)
        batch_sh = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)

        if start is not None:
            abstract = _with_shardings(meta.unbox(boxed_state), state_sh)
            state, data_state, saved_cfg = ckpt.restore(start, abstract)
            if saved_cfg.get("task") != config.task:
                raise ResumeError(
                    f"{workdir} holds a {saved_cfg.get('task')!r} run, not {config.task!r}"
                )
            _restore_data_state(loader, data_state)
            log.info("resumed from step %d of %s", start, workdir)
        else:
            start = 0
            init = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=state_sh)
            state = init(sharding.put_tree(setup.trainable, state_sh.params))
        frozen = sharding.put_tree(setup.frozen, frozen_sh)

        step_fn = jax.jit(
            make_train_step(setup.task.loss, optimizer, int(tcfg.accum_steps)),
            in_shardings=(state_sh, frozen_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
        )
        eval_fn, eval_batches = None, []
        if config.data.get("eval_split") and tcfg.eval_every:
            eval_caches = inputs.open_caches(
                config, models, splits, config.data.eval_split, with_vae
            )
            eval_loader = inputs.make_loader(
                config,
                splits,
                config.data.eval_split,
                eval_caches,
                int(tcfg.eval_batch_size),
                seed=seed,
                shuffle=True,
                num_epochs=1,
            )
            eval_batches = [step_inputs(next(eval_loader)) for _ in range(int(tcfg.eval_batches))]

            def metrics_fn(p, f, b, r):
                loss, m = setup.task.loss(p, f, b, r)
                return {**m, "loss": loss}

            shardings = (state_sh.params, frozen_sh, batch_sh, replicated)
            margins = getattr(setup.task, "margins", None)
            eval_fn = (
                jax.jit(metrics_fn, in_shardings=shardings),
                None if margins is None else jax.jit(margins, in_shardings=shardings),
            )

        lr = make_lr_schedule(config.optim)
        total = int(tcfg.steps)
        every = int(tcfg.checkpoint_every)
        cfg_json = _config_json(config)
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
        stack.callback(writer.close)
        summary: dict[str, Any] = {"workdir": workdir, "start_step": start}
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        progress = tqdm(
            total=total,
            initial=start,
            disable=jax.process_index() != 0 or not tcfg.progress,
            desc=f"{config.task} {config.get('name', '')}",
            dynamic_ncols=True,
        )
        stack.callback(progress.close)
        # Every process reaches the first collective (the step) together; see inputs.barrier.
        inputs.barrier(f"ready:{workdir}:{start}")
        if eval_fn is not None and start == 0:
            eval_metrics = _evaluate(
                eval_fn, state, frozen, eval_batches, mesh, int(tcfg.eval_draws)
            )
            writer.write(0, {f"eval/{k}": v for k, v in eval_metrics.items()})
        tick = time.perf_counter()
        for step in range(start + 1, total + 1):
            local = _fault(config, step, step_inputs(next(loader)), ckpt)
            gb = make_global_batch(local, mesh, PartitionSpec(sharding.BATCH_AXES))
            state, metrics = step_fn(state, frozen, gb)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not m.pop("finite"):
                raise NonFiniteError(
                    f"step {step}: loss {m['loss']}, grad norm {m['grad_norm']} (non-finite); "
                    f"stopped with the state of step {step - 1}; newest checkpoint: "
                    f"{ckpt.latest_step()}"
                )
            now = time.perf_counter()
            m["lr"] = float(lr(step - 1))
            m["pairs_per_s"] = batch_size / max(now - tick, 1e-9)
            tick = now
            writer.write(step, m)
            last = m
            if eval_fn is not None and (step % int(tcfg.eval_every) == 0 or step == total):
                eval_metrics = _evaluate(
                    eval_fn, state, frozen, eval_batches, mesh, int(tcfg.eval_draws)
                )
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if step % every == 0 or step == total:
                ckpt.save(step, state, _data_state(loader), cfg_json)
            progress.update(1)
            progress.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)
        ckpt.wait()
        summary["checkpoints"] = ckpt.all_steps()
    summary.update(step=int(jax.device_get(state.step)), metrics=last, eval=eval_metrics)
    if config.task == "vae":
        summary["vae"] = _export_vae(models.vae, state.params, loader, workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def _export_vae(vae: Any, params: Any, loader: Any, workdir: str) -> dict[str, Any]:
    """Write the trained VAE as a diffusers folder ``<workdir>/vae`` (what ``model.vae_path``
    loads), its ``scaling_factor`` measured on up to 256 training images."""
    params = jax.tree.map(np.asarray, jax.device_get(params))
    images, seen = [], 0
    while seen < 256:
        try:
            b = next(loader)
        except StopIteration:
            break
        images.append(np.concatenate([b["chosen"], b["rejected"]]))
        seen += len(images[-1])
    scale = latent_scaling_factor(vae.module, params, np.concatenate(images))
    folder = os.path.join(workdir, "vae")
    trained = FlaxAutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scale), params)
    if jax.process_index() == 0:
        trained.save_pretrained(folder)
    return {"path": folder, "scaling_factor": scale, "images": seen}


def config_overrides(extra: list[str]) -> list[str]:
    """``--config.a.b=V`` / ``--config.a.b V`` command-line items -> ``["a.b=V", ...]``."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--config."):
            raise SystemExit(f"psa-jax train: unrecognized argument {item!r}")
        body = item[len("--config.") :]
        if "=" not in body:
            if i + 1 >= len(extra):
                raise SystemExit(f"psa-jax train: {item} needs a value")
            body, i = f"{body}={extra[i + 1]}", i + 1
        out.append(body)
        i += 1
    return out


def init_distributed(args: Any) -> None:
    """Multi-host: explicit coordinator flags, or ``--distributed`` for auto-detection
    (TPU pods, SLURM, ...). On CPU the collectives go through gloo."""
    if not (args.coordinator_address or args.distributed):
        return
    # Must not touch the backend before initialize(); gloo only matters for CPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if args.coordinator_address:
        kwargs = dict(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    jax.distributed.initialize(**kwargs)


def _train_cmd(args: Any, extra: list[str]) -> int:
    from psa_jax.config import apply_overrides, load_config

    config = apply_overrides(load_config(args.config), config_overrides(extra))
    for flag, key in (("steps", "steps"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            config.train[key] = getattr(args, flag)
    if args.seed is not None:
        config.seed = args.seed
    init_distributed(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = train(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a PSA adapter (dpo) or a base/LoRA (denoise); resumes from --workdir",
        description="Train from a config; --config.KEY=VALUE overrides any config field.",
    )
    p.add_argument("--config", default="configs/tiny.py", help="configs/*.py file (path[:arg])")
    p.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics, summary")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with auto-detection (pods, SLURM)",
    )
    p.add_argument("--coordinator-address", help="host:port of process 0 (multi-process)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(func=_train_cmd, accepts_extra=True)
