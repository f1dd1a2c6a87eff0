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
restored. Saves are asynchronous (device-to-host copy blocks, the file writes do not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from psa_jax.config import migrate_run_config, stamp_schema

CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS)


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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = checkpoint_dir(workdir)
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

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

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """``(state, data_state, config)`` of ``step``; ``abstract_state`` gives the shapes,
        dtypes and shardings to restore onto (``jax.ShapeDtypeStruct`` leaves)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        config = migrate_run_config(out["config"], f"{self.directory}/{step}")
        return out["state"], dict(out["data"]), config

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype) at ``step``; nothing loaded."""
        meta = self._manager.item_metadata(step)["state"]
        return meta.tree if hasattr(meta, "tree") else meta

    def read_config(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return migrate_run_config(out["config"], f"{self.directory}/{step}")

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
