"""Fault injection for trainer tests, as ``trainer.train(..., batch_hook=...)`` hooks: the
trainer itself holds no test switches."""

from __future__ import annotations

import os
import signal

import numpy as np


def kill_at(step: int):
    """SIGKILL this process when (1-based) ``step`` begins, after in-flight checkpoint writes
    finish: a machine lost mid-run."""

    def hook(at: int, batch: dict, ckpt) -> dict:
        if at == step:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return batch

    return hook


def nan_at(step: int):
    """Poison one profile embedding of ``step``'s batch with NaN."""

    def hook(at: int, batch: dict, ckpt) -> dict:
        if at != step:
            return batch
        embeds = np.array(batch["user_embeds"], copy=True)
        embeds[0, 0] = np.nan
        return {**batch, "user_embeds": embeds}

    return hook
