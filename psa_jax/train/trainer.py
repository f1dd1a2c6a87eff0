"""``train(config, workdir)``: one trainer for every task, from one CPU to a pod.

Before anything is built, :func:`check_config` checks the loop and optimizer values (a batch of
0, a negative learning rate fail in milliseconds, not after the models and data are set up, and
no workdir is made).

Resume order: the newest complete checkpoint in ``workdir`` (state, data position, nothing else
needed) -> a fresh start from the config (frozen base per :mod:`psa_jax.models.loading`; a
``dpo`` run's adapter from ``model.init_adapter`` when set, else freshly initialised). A
newest step that cannot be read stops the run with a
:class:`~psa_jax.core.checkpoint.CheckpointError` naming it; ``restore_step=N`` resumes from
step N, ``fallback_on_corrupt`` from the newest readable step. The steps above the one resumed
from are moved aside (renamed, logged, never deleted) so that the run can write them again.

Per step: host batch (this process's rows) -> global ``jax.Array`` sharded over
``data x fsdp`` -> jitted ``train_step`` (state donated) -> metrics to JSONL/TensorBoard, read
one step late (after the next step is dispatched; at once at evaluation and checkpoint steps).
A non-finite loss or gradient norm raises :class:`NonFiniteError`; the step that produced it
changed nothing, and the checkpoints on disk are the last good ones.

``workdir`` may be a ``gs://`` URI (:mod:`psa_jax.core.paths`): checkpoints, metrics and
``summary.json`` go there; the data cache stays local.

``train`` is four parts: :func:`prepare_inputs` (frozen models, data, loader),
:func:`create_state` (shardings, then the restored or initial state), :func:`compile_step` /
:func:`make_evaluator`, and :func:`run_loop`. ``batch_hook(step, batch, checkpointer)`` sees
each batch before its step: tests inject faults with it (``tests/faults.py``), the trainer
holds none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec
from tqdm.auto import tqdm

from psa_jax.core import parallel, paths
from psa_jax.core.checkpoint import Checkpointer, CheckpointError, check_workdir, complete_steps
from psa_jax.core.errors import PsaJaxError
from psa_jax.data import prepare
from psa_jax.data.loader import make_global_batch
from psa_jax.models import loading
from psa_jax.models.vae import FlaxAutoencoderKL
from psa_jax.train.checks import ConfigValueError, check_config
from psa_jax.train.evaluation import make_evaluator
from psa_jax.train.metrics_io import MetricWriter
from psa_jax.train.optim import make_lr_schedule, make_optimizer
from psa_jax.train.step import (
    init_state,
    latent_scaling_factor,
    make_train_step,
    step_inputs,
)
from psa_jax.train.tasks import (
    Setup,
    build_task,
    pair_weigher,
    training_user_embeds,
    user_proj_optimizer,
)

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; training stopped, checkpoints intact."""


class ResumeError(PsaJaxError, RuntimeError):
    """A checkpoint cannot continue this run (other process count, other task)."""


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


BatchHook = Callable[[int, dict, Checkpointer], dict]


@dataclasses.dataclass
class RunInputs:
    """The frozen models and the training data of a run."""

    models: loading.BaseModels
    splits: prepare.Splits
    loader: Any
    batch_size: int  # global pairs per update: batch_size x accum_steps
    with_vae: bool  # latents from the caches (every task but "vae", which learns from pixels)


@dataclasses.dataclass
class RunState:
    """Where the loop starts: the (restored or initial) state, the frozen tree on devices, the
    task and the shardings everything was placed with."""

    setup: Setup
    optimizer: Any
    state: Any
    frozen: Any
    start: int
    mesh: Any
    shardings: dict[str, Any]  # state, frozen, batch, replicated
    moved_aside: dict[int, str] = dataclasses.field(default_factory=dict)  # step -> folder


def prepare_inputs(config: Any) -> RunInputs:
    models = loading.load_base_models(config)
    splits = prepare.prepare_data(config, models)
    with_vae = config.task != "vae"
    caches = prepare.open_caches(config, models, splits, config.data.train_split, with_vae)
    batch_size = int(config.train.batch_size) * int(config.train.accum_steps)
    loader = prepare.make_loader(
        config, splits, config.data.train_split, caches, batch_size, seed=int(config.seed)
    )
    return RunInputs(models, splits, loader, batch_size, with_vae)


def state_shardings(config: Any, setup: Setup, optimizer: Any, mesh: Any) -> tuple[Any, dict]:
    """The abstract (boxed) train state and the shardings of state, frozen tree, batch and
    replicated values, from the modules' logical axes and ``config.mesh``'s rules."""
    seed, rules = int(config.seed), parallel.logical_rules(config.mesh)
    boxed = jax.eval_shape(lambda p: init_state(p, optimizer, seed), setup.trainable_boxes)
    return boxed, {
        "state": parallel.tree_shardings(boxed, mesh, rules),
        "frozen": parallel.tree_shardings(setup.frozen_boxes, mesh, rules),
        "batch": parallel.batch_sharding(mesh),
        "replicated": parallel.replicated(mesh),
    }


def create_state(
    config: Any,
    inputs: RunInputs,
    ckpt: Checkpointer,
    mesh: Any,
    *,
    restore_step: int | None = None,
    fallback_on_corrupt: bool = False,
) -> RunState:
    """Shardings from the modules' logical axes, then the newest checkpoint's state (and data
    position) or a fresh one; the frozen tree is placed on the mesh.

    ``restore_step``: resume from that step instead of the newest. ``fallback_on_corrupt``:
    an unreadable step is skipped (logged) for the newest readable one at or below it. The
    steps above the one restored are moved aside (see ``Checkpointer.set_aside``)."""
    steps = ckpt.all_steps()
    resuming = bool(steps)
    # On resume the checkpoint holds the adapter: the split is scanned for its users only if
    # the optimizer steps in their coordinates (train.user_proj_space).
    embeds = training_user_embeds(config, inputs.splits, inputs.loader, resuming=resuming)
    setup = build_task(config, inputs.models, embeds, resuming=resuming)
    optimizer = user_proj_optimizer(config, make_optimizer(config.optim), embeds)
    seed = int(config.seed)
    boxed_state, shardings = state_shardings(config, setup, optimizer, mesh)
    state_sh = shardings["state"]
    moved: dict[int, str] = {}
    if resuming:
        abstract = _with_shardings(meta.unbox(boxed_state), state_sh)
        start, state, moved = _resume(config, inputs, ckpt, abstract, restore_step,
                                      fallback_on_corrupt)  # fmt: skip
    else:
        start = 0
        init = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=state_sh)
        state = init(parallel.put_tree(setup.trainable, state_sh.params))
    frozen = parallel.put_tree(setup.frozen, shardings["frozen"])
    return RunState(setup, optimizer, state, frozen, start, mesh, shardings, moved)


def _resume(
    config: Any,
    inputs: RunInputs,
    ckpt: Checkpointer,
    abstract: Any,
    restore_step: int | None,
    fallback_on_corrupt: bool,
) -> tuple[int, Any, dict[int, str]]:
    """``(step, state, moved)`` from the checkpoint to continue from (see :func:`create_state`);
    the loader is set to that step's data position."""
    steps = ckpt.all_steps()
    try:
        resumed = ckpt.resume(abstract, step=restore_step, fallback_on_corrupt=fallback_on_corrupt)
    except CheckpointError as e:
        if restore_step is not None or fallback_on_corrupt or len(steps) < 2:
            raise
        raise CheckpointError(
            f"{e}; to resume from an older step ({steps[:-1]}) instead: --restore-step N "
            "or --fallback-on-corrupt (unreadable steps are moved aside, not deleted)"
        ) from e
    start, saved_cfg = resumed.step, resumed.config
    if saved_cfg.get("task") != config.task:
        raise ResumeError(
            f"{ckpt.directory} holds a {saved_cfg.get('task')!r} run, not {config.task!r}"
        )
    _restore_data_state(inputs.loader, resumed.data)
    if resumed.unreadable:
        log.warning("resuming from step %d of %s, the newest readable step (unreadable: %s)",
                    start, ckpt.directory, sorted(resumed.unreadable))  # fmt: skip
    # Steps above the one restored would be overwritten (or outrank it as the newest):
    # moved aside, never deleted.
    reasons = {s: "damaged" if s in resumed.unreadable else "set-aside"
               for s in steps if s > start}  # fmt: skip
    moved = ckpt.set_aside(reasons)
    log.info("resumed from step %d of %s", start, ckpt.directory)
    return start, resumed.state, moved


def compile_step(config: Any, run: RunState) -> Callable:
    """The jitted train step: state donated, placed as :func:`create_state` placed it, traced
    under the mesh and the config's logical-axis rules (the modules' activations split over
    the batch: ``parallel.with_logical_axes``)."""
    sh = run.shardings
    step = make_train_step(run.setup.task.loss, run.optimizer, int(config.train.accum_steps))
    return jax.jit(
        parallel.under_mesh_rules(step, run.mesh, config.mesh),
        in_shardings=(sh["state"], sh["frozen"], sh["batch"]),
        out_shardings=(sh["state"], sh["replicated"]),
        donate_argnums=(0,),
    )


def run_loop(
    config: Any,
    workdir: str,
    inputs: RunInputs,
    run: RunState,
    step_fn: Callable,
    evaluate: Callable | None,
    ckpt: Checkpointer,
    writer: MetricWriter,
    batch_hook: BatchHook | None = None,
) -> tuple[Any, dict, dict]:
    """Steps ``run.start + 1 .. train.steps``: returns the final state, the last step's metrics
    and the last evaluation. Evaluates at step 0 of a fresh run, every ``eval_every`` steps and
    at the end; checkpoints every ``checkpoint_every`` steps and at the end."""
    tcfg, state, start = config.train, run.state, run.start
    total, every, cfg_json = int(tcfg.steps), int(tcfg.checkpoint_every), _config_json(config)
    lr = make_lr_schedule(config.optim)
    weigh = pair_weigher(config, inputs.splits, inputs.loader.user_ids)
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    progress = tqdm(total=total, initial=start, desc=f"{config.task} {config.get('name', '')}",
                    disable=jax.process_index() != 0 or not tcfg.progress,
                    dynamic_ncols=True)  # fmt: skip
    # Every process reaches the first collective (the step) together; see parallel.barrier.
    parallel.barrier(f"ready:{workdir}:{start}")
    if evaluate is not None and start == 0:
        eval_metrics = evaluate(state)
        writer.write(0, {f"eval/{k}": v for k, v in eval_metrics.items()})
    tick = time.perf_counter()
    pending: tuple[int, Any] | None = None  # the dispatched step whose metrics are not read

    def finish(done: tuple[int, Any]) -> None:
        """Read step ``done``'s metrics (waits for it), check them, log them."""
        nonlocal tick, last
        step, metrics = done
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
            raise NonFiniteError(
                f"step {step}: loss {m['loss']}, grad norm {m['grad_norm']} (non-finite); "
                f"stopped with the state of step {step - 1}; newest checkpoint: "
                f"{ckpt.latest_step()}"
            )
        now = time.perf_counter()
        m.update(lr=float(lr(step - 1)), pairs_per_s=inputs.batch_size / max(now - tick, 1e-9))
        tick, last = now, m
        writer.write(step, m)
        progress.update(1)
        progress.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)

    try:
        for step in range(start + 1, total + 1):
            # Step ``step - 1`` may still run: its metrics are read only once this step is
            # dispatched (one-step lag), so the host prepares and places this batch meanwhile
            # and the device never waits for the host between steps.
            batch = next(inputs.loader)
            local = step_inputs(batch)
            if weigh is not None:
                local["loss_weight"] = weigh(batch)
            if batch_hook is not None:
                local = batch_hook(step, local, ckpt)
            gb = make_global_batch(local, run.mesh, PartitionSpec(parallel.BATCH_AXES))
            # A non-finite step leaves the state as it was, so the step dispatched after it
            # starts from the last good state; its error is raised by finish() below.
            state, metrics = step_fn(state, run.frozen, gb)
            if pending is not None:
                finish(pending)
            pending = (step, metrics)
            evaluating = evaluate is not None and (step % int(tcfg.eval_every) == 0
                                                   or step == total)  # fmt: skip
            saving = step % every == 0 or step == total
            if evaluating or saving:
                finish(pending)  # nothing is evaluated or saved before its step is checked
                pending = None
            if evaluating:
                eval_metrics = evaluate(state)
                writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if saving:
                ckpt.save(step, state, _data_state(inputs.loader), cfg_json)
                writer.sync()  # gs://: metrics as far as the checkpoint (local: nothing)
    finally:
        progress.close()
    return state, last, eval_metrics


def train(
    config: Any,
    workdir: str | os.PathLike,
    *,
    batch_hook: BatchHook | None = None,
    restore_step: int | None = None,
    fallback_on_corrupt: bool = False,
) -> dict[str, Any]:
    """Train until ``config.train.steps``, resuming from ``workdir`` when it has a checkpoint.

    Returns a summary: final step, last train metrics, last eval metrics, checkpoint steps
    (and ``moved_aside``, the step folders moved out of the way, when there were any).
    ``restore_step`` / ``fallback_on_corrupt``: see :func:`create_state`.
    ``batch_hook``: see the module docstring (tests only).
    """
    check_config(config)  # first: a bad value fails before any set-up and makes no folder
    workdir = paths.absolute(workdir)  # a local folder or gs://bucket/... (core.paths)
    check_workdir(workdir)  # gs://: its client libraries, before any set-up
    if restore_step is not None and restore_step not in (have := complete_steps(workdir)):
        raise CheckpointError(
            f"restore_step {restore_step}: no complete checkpoint step {restore_step} in "
            f"{os.path.join(workdir, 'checkpoints')} (steps: {have})"
        )
    mesh = parallel.make_mesh(config.mesh)
    global_batch = int(config.train.batch_size) * int(config.train.accum_steps)
    if global_batch % parallel.data_parallel_size(mesh):
        raise ConfigValueError(
            f"train.batch_size x train.accum_steps = {global_batch} does not split over the "
            f"mesh {dict(mesh.shape)}"
        )
    inputs = prepare_inputs(config)
    paths.makedirs(workdir)  # only once the inputs are known good
    # One exit stack from the checkpointer on: a set-up error (config, sharding) closes the
    # manager too, and the writer closes before it, as they were opened.
    with contextlib.ExitStack() as stack:
        tcfg = config.train
        ckpt = stack.enter_context(Checkpointer(workdir, max_to_keep=tcfg.keep_checkpoints,
                                                async_save=tcfg.async_checkpoint))  # fmt: skip
        run = create_state(config, inputs, ckpt, mesh, restore_step=restore_step,
                           fallback_on_corrupt=fallback_on_corrupt)  # fmt: skip
        step_fn = compile_step(config, run)
        evaluate = make_evaluator(config, inputs, run)
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
        stack.callback(writer.close)
        state, last, eval_metrics = run_loop(
            config, workdir, inputs, run, step_fn, evaluate, ckpt, writer, batch_hook
        )
        ckpt.wait()
        checkpoints = ckpt.all_steps()
    step = int(jax.device_get(state.step))
    summary = dict(workdir=workdir, start_step=run.start, checkpoints=checkpoints, step=step,
                   metrics=last, eval=eval_metrics)  # fmt: skip
    if run.moved_aside:
        summary["moved_aside"] = {str(k): v for k, v in run.moved_aside.items()}
    if config.task == "vae":
        summary["vae"] = _export_vae(inputs.models.vae, state.params, inputs.loader, workdir)
    if jax.process_index() == 0:
        with paths.open_file(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
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
        with paths.staged(folder) as out:  # gs://: written locally, then uploaded
            trained.save_pretrained(out)
    return {"path": folder, "scaling_factor": scale, "images": seen}
