"""Training's early failures, named: a damaged newest checkpoint (refused by default, resumed
from an older step on request, never deleted) and config values that cannot train (refused in
seconds, before any model or data is built and before the workdir exists).

Every run goes through ``psa_jax.cli.main`` in this process, as ``psa-jax train`` would: exit
status 2 and one ``psa-jax train: error: ...`` line for a named error.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
import pytest
from helpers import SMALL_WORLD
from snapshots import tree_digest
from test_trainer import ROOT

from psa_jax import cli
from psa_jax.core.checkpoint import Checkpointer, restore_host_params

STEPS, EVERY = 4, 2  # the base run: checkpoints 2 and 4


def train_args(cache: str, workdir: str, *args: str) -> list[str]:
    overrides = [f"--config.{o}" for o in (*SMALL_WORLD, f"data.cache_dir={cache}")]
    config = os.path.join(ROOT, "configs", "tiny.py")
    return ["train", "--config", config, "--workdir", workdir, *overrides, *args]


def run_train(cache: str, workdir: str, *args: str) -> int:
    common = ("--steps", str(STEPS), "--checkpoint-every", str(EVERY))
    return cli.main(train_args(cache, workdir, *common, *args))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def error_line(err: str) -> str:
    """The one ``psa-jax train: error:`` line of a run's stderr (and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("psa-jax train: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("psa_cache"))


@pytest.fixture(scope="module")
def base_run(cache, tmp_path_factory) -> str:
    """A finished 4-step run with checkpoints 2 and 4; tests work on copies of it."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    assert run_train(cache, workdir) == 0
    assert Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
    return workdir


def copy_of(base_run: str, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(base_run, workdir)
    return workdir


def truncate_state(workdir: str, step: int = STEPS) -> str:
    """Cut the largest array file of ``step``'s state in half (a disk that lost its tail)."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)  # fmt: skip
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "state"


def garble_data(workdir: str, step: int = STEPS) -> str:
    """Overwrite ``step``'s data-iterator JSON with bytes that are not JSON."""
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata"), "wb") as f:
        f.write(b"\x00garbled{")
    return "data"


@pytest.mark.parametrize("damage", [truncate_state, garble_data])
def test_a_damaged_newest_checkpoint_is_refused_by_name_and_left_untouched(
    cache, base_run, tmp_path, capsys, damage
):
    workdir = copy_of(base_run, tmp_path)
    item = damage(workdir)
    before = tree_digest(workdir)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = run_train(cache, workdir, "--steps", "6")
    print(f"refused in {time.perf_counter() - t0:.1f} s")
    err = capsys.readouterr().err
    assert rc == 2
    line = error_line(err)
    folder = os.path.join(workdir, "checkpoints", "4", item)
    assert "checkpoint step 4" in line and f"item {item!r}" in line and folder in line, line
    assert "--restore-step" in line and "--fallback-on-corrupt" in line, line
    assert tree_digest(workdir) == before  # nothing written, renamed or deleted


@pytest.mark.slow  # ~35-50 s: compiles and trains two steps
def test_fallback_on_corrupt_resumes_from_the_newest_readable_step(
    cache, base_run, tmp_path, caplog
):
    workdir = copy_of(base_run, tmp_path)
    truncate_state(workdir)
    damaged = tree_digest(os.path.join(workdir, "checkpoints", "4"))
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert run_train(cache, workdir, "--fallback-on-corrupt") == 0
    print(f"resumed and trained in {time.perf_counter() - t0:.1f} s")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("resuming from step 2" in m and "newest readable" in m for m in warnings)
    assert any("moved aside" in m for m in warnings)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["start_step"] == 2 and summary["step"] == STEPS
    # The damaged folder is kept, byte for byte, under a name orbax does not list as a step.
    (aside,) = glob.glob(os.path.join(workdir, "checkpoints", "4.damaged-*"))
    assert summary["moved_aside"] == {"4": aside}
    assert tree_digest(aside) == damaged
    assert Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
    want, _ = restore_host_params(base_run)
    got, _ = restore_host_params(workdir)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(want), leaves(got)))


@pytest.mark.slow  # ~35-50 s: compiles and trains two steps
def test_restore_step_resumes_there_and_moves_newer_steps_aside(cache, base_run, tmp_path):
    workdir = copy_of(base_run, tmp_path)
    newer = tree_digest(os.path.join(workdir, "checkpoints", "4"))
    t0 = time.perf_counter()
    assert run_train(cache, workdir, "--restore-step", "2") == 0
    print(f"resumed and trained in {time.perf_counter() - t0:.1f} s")
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["start_step"] == 2
    (aside,) = glob.glob(os.path.join(workdir, "checkpoints", "4.set-aside-*"))
    assert tree_digest(aside) == newer
    assert Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
    want, _ = restore_host_params(base_run)
    got, _ = restore_host_params(workdir)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(want), leaves(got)))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=0", "train.batch_size=0"),
        ("optim.learning_rate=-1", "optim.learning_rate=-1"),
        ("train.accum_steps=0", "train.accum_steps=0"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0"),
        ("train.eval_every=-1", "train.eval_every=-1"),
        ("task=dpoo", "task='dpoo'"),
        ("optim.schedule=linear", "optim.schedule='linear'"),
    ],
)
def test_a_config_value_that_cannot_train_fails_in_seconds(cache, tmp_path, capsys, override, key):
    workdir = str(tmp_path / "run")
    t0 = time.perf_counter()
    rc = cli.main(train_args(cache, workdir, f"--config.{override}"))
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    print(f"{override}: exit {rc} in {elapsed:.2f} s")
    assert rc == 2
    assert key in error_line(err)
    assert not os.path.exists(workdir)


def test_restore_step_that_does_not_exist_fails_before_set_up(cache, base_run, tmp_path, capsys):
    workdir = copy_of(base_run, tmp_path)
    before = tree_digest(workdir)
    t0 = time.perf_counter()
    rc = run_train(cache, workdir, "--restore-step", "3")
    print(f"refused in {time.perf_counter() - t0:.2f} s")
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert "restore_step 3" in line and "[2, 4]" in line, line
    assert tree_digest(workdir) == before
    missing = str(tmp_path / "none")
    assert run_train(cache, missing, "--restore-step", "2") == 2
    assert not os.path.exists(missing)
