"""Orbax checkpoints of a run: trainable state, data iterator position and resolved config.

``<workdir>/checkpoints/<step>/`` holds three items:

* ``state``  -- :class:`~psa_jax.train.step.TrainState` (trainable params, optimizer state,
  step, rng), sharded arrays written by every process; never the frozen base;
* ``data``   -- the loader's iterator state (JSON), so a resumed run reads exactly the batches
  the uninterrupted run would have read;
* ``config`` -- the resolved config (JSON), what the run was, with the ``schema_version`` it
  was written with; reading it applies :func:`psa_jax.config.migrate_run_config`.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-write leaves no step that ``latest_step`` would return: a partial checkpoint is never
restored. On ``gs://`` (a workdir may be one, see :mod:`psa_jax.core.paths`) orbax writes the
step in place and marks it complete with a ``commit_success.txt`` written last; the same holds.
Saves are asynchronous (device-to-host copy blocks, the file writes do not).

A step that is complete but cannot be read (a truncated or garbled file) raises
:class:`CheckpointError`, naming the step, the item and its folder. :meth:`Checkpointer.resume`
can fall back to an older step instead; steps a resumed run must not keep (damaged ones, or
newer ones than the step asked for) are moved aside by :meth:`Checkpointer.set_aside`, never
deleted: ``<step>.<reason>-<unix time>`` in the same folder, a name that orbax does not list as a
step (it lists only names that are a bare step number), so the run can save that step again
(on gs:// such a move is a copy and a delete of every object of the step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from psa_jax.config import migrate_run_config, stamp_schema
from psa_jax.core import parallel, paths
from psa_jax.core.errors import PsaJaxError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ITEMS = ("config", "data", "state")  # restored in this order: the cheap ones first


class CheckpointError(PsaJaxError, RuntimeError):
    """A checkpoint step on disk cannot be read (a damaged file, a missing item) or does not
    exist; the message names the step, the item and the folder."""


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``exc``: the original error (orbax wraps
    tensorstore's in exceptions whose own message says little)."""
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` on every process (one process: ``ok``)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@dataclasses.dataclass
class Resumed:
    """What :meth:`Checkpointer.resume` restored, and which steps it could not read."""

    step: int
    state: Any
    data: dict
    config: dict
    unreadable: dict[int, str]  # newer steps tried first and failed: step -> error message


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(paths.absolute(workdir), CHECKPOINTS)


def check_workdir(workdir: str | os.PathLike) -> None:
    """A gs:// run folder: the client libraries are there (:func:`paths.check_remote`) and
    orbax's bucket lookup (google-cloud-storage) works; called before any model is built.
    A local folder: nothing to check."""
    directory = checkpoint_dir(workdir)
    if not paths.is_remote(directory):
        return
    paths.check_remote(directory)
    from orbax.checkpoint._src.path import gcs_utils

    try:
        gcs_utils.is_hierarchical_namespace_enabled(directory)  # cached: orbax asks the same
    except ImportError as e:
        raise paths.RemotePathError(
            f"checkpoints in {directory!r}: orbax needs google-cloud-storage for gs:// "
            "(pip install 'psa_jax[gcs]')"
        ) from e


class Checkpointer:
    """A thin, typed wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        self._options = dict(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = checkpoint_dir(workdir)
        check_workdir(workdir)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        options = ocp.CheckpointManagerOptions(**self._options)
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def reopen(self) -> None:
        """A new orbax manager over the folder: its step list read again from disk (after
        folders were moved), every pending save finished first."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._manager = self._open()

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint's step (temporary folders are not steps)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: Any, data_state: Mapping[str, Any], config: Mapping[str, Any]
    ) -> None:
        """Start saving ``step`` (returns once arrays are on the host; files are written in
        the background). ``force``: a step is saved whenever the trainer asks."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(json.loads(json.dumps(stamp_schema(config)))),
        )
        self._manager.save(step, args=args, force=True)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore_item(self, step: int, item: str, arg: Any) -> Any:
        """One item of ``step``; any failure to read it is a :class:`CheckpointError`."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: arg}))[item]
        except MemoryError:
            raise
        except Exception as e:
            folder = os.path.join(self.step_dir(step), item)
            raise CheckpointError(
                f"checkpoint step {step}: cannot restore item {item!r} from {folder}: "
                f"{_first_line(e)}"
            ) from e

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """``(state, data_state, config)`` of ``step``; ``abstract_state`` gives the shapes,
        dtypes and shardings to restore onto (``jax.ShapeDtypeStruct`` leaves). An item that
        cannot be read raises :class:`CheckpointError` naming it."""
        args = {
            "config": ocp.args.JsonRestore(),
            "data": ocp.args.JsonRestore(),
            "state": ocp.args.StandardRestore(abstract_state),
        }
        out = {item: self._restore_item(step, item, args[item]) for item in ITEMS}
        config = migrate_run_config(out["config"], self.step_dir(step))
        return out["state"], dict(out["data"]), config

    def resume(
        self, abstract_state: Any, *, step: int | None = None, fallback_on_corrupt: bool = False
    ) -> Resumed | None:
        """Restore the step a run continues from: ``step``, or the newest; None without any.

        A step that cannot be read raises its :class:`CheckpointError`, unless
        ``fallback_on_corrupt``: then each older step is tried in turn (newest first, never
        above ``step``), every failure logged, and the newest readable one is restored (with
        several processes, one that every process read). Nothing is moved here: see
        :meth:`set_aside` for the steps above the one restored.
        """
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(
                f"no checkpoint step {step} in {self.directory} (complete steps: {steps})"
            )
        if not steps:
            return None
        top = steps[-1] if step is None else step
        candidates = [s for s in reversed(steps) if s <= top]
        unreadable: dict[int, str] = {}
        for s in candidates if fallback_on_corrupt else candidates[:1]:
            try:
                state, data, config = self.restore(s, abstract_state)
                error = None
            except CheckpointError as e:
                if not fallback_on_corrupt:
                    raise
                error = str(e)
            if fallback_on_corrupt and not _all_processes(error is None) and error is None:
                error = f"checkpoint step {s}: unreadable on another process"
            if error is None:
                return Resumed(s, state, data, config, unreadable)
            log.warning("%s; trying an older step (fallback_on_corrupt)", error)
            unreadable[s] = error
        raise CheckpointError(
            f"no readable checkpoint step in {self.directory} at or below step {top}: "
            + "; ".join(unreadable.values())
        )

    def set_aside(self, reasons: Mapping[int, str]) -> dict[int, str]:
        """Move the folders of ``{step: reason}`` out of the way, never deleting them:
        ``<step>`` -> ``<step>.<reason>-<unix time>`` in the same folder (orbax lists only
        bare step numbers as steps), each move logged; then the manager is reopened, so that
        ``latest_step`` no longer sees them and the run can save those steps again. Process 0
        moves, every process reopens. Returns ``{step: new folder}`` (on process 0)."""
        if not reasons:
            return {}
        self._manager.wait_until_finished()
        moved: dict[int, str] = {}
        stamp = int(time.time())
        if jax.process_index() == 0:
            for step, reason in sorted(reasons.items()):
                src = self.step_dir(step)
                dst, n = f"{src}.{reason}-{stamp}", 1
                while paths.exists(dst):
                    dst, n = f"{src}.{reason}-{stamp}-{n}", n + 1
                if paths.is_remote(src):
                    paths.path(src).rename(dst)
                else:
                    os.rename(src, dst)
                moved[step] = dst
                log.warning("checkpoint step %d (%s) moved aside, not deleted: %s -> %s",
                            step, reason, src, dst)  # fmt: skip
        parallel.barrier(f"set_aside:{self.directory}:{sorted(reasons)}")
        self.reopen()
        return moved

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype) at ``step``; nothing loaded."""
        try:
            meta = self._manager.item_metadata(step)["state"]
        except MemoryError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step}: cannot read the metadata of item 'state' in "
                f"{os.path.join(self.step_dir(step), 'state')}: {_first_line(e)}"
            ) from e
        return meta.tree if hasattr(meta, "tree") else meta

    def read_config(self, step: int) -> dict:
        config = self._restore_item(step, "config", ocp.args.JsonRestore())
        return migrate_run_config(config, self.step_dir(step))

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def complete_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps of a run folder, ``[]`` without any; writes nothing."""
    if not paths.isdir(checkpoint_dir(workdir)):
        return []
    with Checkpointer(workdir, read_only=True) as ckpt:
        return ckpt.all_steps()


def restore_host_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, dict]:
    """The trainable params of a run's checkpoint as host numpy arrays, plus its config.

    Needs no mesh and no knowledge of how the run was sharded: every array is restored whole
    onto this process's first device, then copied to numpy. For export and ``load_adapter``.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(m: Any) -> Any:
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
        return m

    with Checkpointer(workdir, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        target = jax.tree.map(abstract, ckpt.state_metadata(step))
        state, _, config = ckpt.restore(step, target)
    params = state["params"] if isinstance(state, Mapping) else state.params
    return jax.tree.map(np.asarray, params), config


class RunNotFoundError(PsaJaxError, FileNotFoundError):
    """A folder that is not a ``psa-jax train`` run with a complete checkpoint (or the step
    asked for)."""


def require_run(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """``(step, config)`` of run ``workdir``'s newest complete checkpoint (or ``step``): a cheap
    look, made before any model is built, that raises :class:`RunNotFoundError` naming the
    folder when it is not a run, holds no complete checkpoint, or not that step."""
    if not paths.isdir(workdir):
        raise RunNotFoundError(f"run folder {workdir!r} does not exist")
    if not paths.isdir(checkpoint_dir(workdir)):
        raise RunNotFoundError(f"{workdir!r} is not a psa-jax train run (no checkpoints/ folder)")
    with Checkpointer(workdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps or ckpt.latest_step() is None:
            raise RunNotFoundError(f"{workdir!r} holds no complete checkpoint")
        if step is None:
            step = ckpt.latest_step()
        elif step not in steps:
            raise RunNotFoundError(f"{workdir!r} has no checkpoint of step {step}; it has {steps}")
        return int(step), ckpt.read_config(step)
